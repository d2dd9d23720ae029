"""Where code lives: the library owns every pipeline, `qinco_jax/cli/` the programs, and
train/, search/, convert/ only shims with the reference's script names."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIM_FOLDERS = ("train", "search", "convert")
PATH_EDIT = re.compile(r"sys\s*\.\s*path\s*\.\s*(insert|append|extend)|sys\s*\.\s*path\s*(\+?=)")


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_the_library_never_imports_the_script_folders():
    bad = [(str(p.relative_to(ROOT)), m) for p in (ROOT / "qinco_jax").rglob("*.py")
           for m in _imported_modules(p) if m.split(".")[0] in SHIM_FOLDERS]
    assert not bad, f"library modules import scripts: {bad}"


def test_script_folders_hold_only_shims_of_package_programs():
    shims = [p for folder in SHIM_FOLDERS for p in (ROOT / folder).rglob("*") if "__pycache__" not in p.parts]
    assert shims
    for p in shims:
        assert p.suffix == ".py", f"{p.relative_to(ROOT)}: only shim scripts belong in {p.parent.name}/"
        _assert_shim(p)


def _assert_shim(p: Path) -> None:
    """p only imports one program of qinco_jax.cli and runs it, in a few lines."""
    code = [ln for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    tree = ast.parse(p.read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert len(imports) == 1 and isinstance(imports[0], ast.ImportFrom), p
    module = imports[0].module
    assert module.startswith("qinco_jax.cli."), f"{p.relative_to(ROOT)} runs {module}"
    assert callable(getattr(importlib.import_module(module), "run")), module
    assert len(code) <= 8, f"{p.relative_to(ROOT)} is not a shim ({len(code)} lines)"


def test_root_run_py_is_a_shim():
    """QINCo2's `python run.py task=...` lives at the root, like the reference's."""
    _assert_shim(ROOT / "run.py")
    assert not PATH_EDIT.search((ROOT / "run.py").read_text())


def test_no_sys_path_edits():
    files = [p for folder in ("qinco_jax", "tests", *SHIM_FOLDERS) for p in (ROOT / folder).rglob("*.py")]
    bad = [str(p.relative_to(ROOT)) for p in files if p.name != Path(__file__).name and PATH_EDIT.search(p.read_text())]
    assert not bad, f"sys.path edited in {bad}"


def entry_points() -> dict[str, str]:
    """[project.scripts] of pyproject.toml (read without tomllib: Python 3.10 has none)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, re.M))


def test_every_entry_point_names_a_program():
    scripts = entry_points()
    assert {"qinco-train", "qinco-train-pq", "qinco-codec", "qinco-convert", "qinco-eval", "qinco-index",
            "qinco-search-2stage", "qinco-plot", "qinco-run"} <= set(scripts)
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert module.startswith("qinco_jax.cli."), name
        assert callable(getattr(importlib.import_module(module), func)), target
        assert callable(getattr(importlib.import_module(module), "build_parser")), module
