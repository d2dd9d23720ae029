"""Where code lives: the library owns every pipeline, `qinco_jax/cli/` the programs, and
train/, search/, convert/ only shims with the reference's script names."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

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
    """The library, the tests, the shims and the benchmarks run with the package installed
    (or PYTHONPATH naming the checkout), as a user would: none edits sys.path."""
    files = [p for folder in ("qinco_jax", "tests", "bench", *SHIM_FOLDERS) for p in (ROOT / folder).rglob("*.py")]
    assert any(p.parent.name == "bench" for p in files)
    bad = [str(p.relative_to(ROOT)) for p in files if p.name != Path(__file__).name and PATH_EDIT.search(p.read_text())]
    assert not bad, f"sys.path edited in {bad}"


def test_benchmarks_import_only_the_library_and_each_other_not():
    """bench/ is a folder of scripts, not a package: a benchmark imports qinco_jax (shared
    helpers such as timing live there), never a sibling script."""
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")}
    assert scripts
    bad = [(p.name, m) for p in (ROOT / "bench").glob("*.py") for m in _imported_modules(p)
           if m.split(".")[0] in scripts | {"bench", "timing"}]
    assert not bad, f"benchmarks import sibling scripts: {bad}"


def test_build_outputs_are_ignored_by_git():
    ignored = set((ROOT / ".gitignore").read_text().split())
    assert {"/build/", "/site/"} <= ignored


def test_import_reference_loads_a_checkout_without_touching_sys_path(tmp_path, monkeypatch):
    """The benchmarks' way to time the PyTorch reference: its modules loaded from their files,
    siblings first, the checkout never put on sys.path."""
    import sys

    from qinco_jax.experiments.reference import import_reference

    (tmp_path / "refutil_x1.py").write_text("VALUE = 41\n")
    (tmp_path / "refmodel_x1.py").write_text("from refutil_x1 import VALUE\nANSWER = VALUE + 1\n")
    (tmp_path / "refpkg_x1").mkdir()
    (tmp_path / "refpkg_x1" / "__init__.py").write_text("")
    (tmp_path / "refpkg_x1" / "tasks.py").write_text("from refpkg_x1 import helpers\nNAME = helpers.NAME\n")
    (tmp_path / "refpkg_x1" / "helpers.py").write_text("NAME = 'tasks'\n")
    for name in ("refutil_x1", "refmodel_x1", "refpkg_x1", "refpkg_x1.tasks", "refpkg_x1.helpers"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    path_before = list(sys.path)
    assert import_reference(tmp_path, "refutil_x1", "refmodel_x1").ANSWER == 42
    import_reference(tmp_path, "refpkg_x1")
    import refpkg_x1.tasks

    assert refpkg_x1.tasks.NAME == "tasks"
    assert import_reference(tmp_path, "refutil_x1") is sys.modules["refutil_x1"]  # reused, not reloaded
    assert sys.path == path_before
    with pytest.raises(FileNotFoundError, match="no module 'model_qinco'"):
        import_reference(tmp_path, "model_qinco")
    for name in ("refutil_x1", "refmodel_x1", "refpkg_x1", "refpkg_x1.tasks", "refpkg_x1.helpers"):
        sys.modules.pop(name, None)


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


def test_device_check_script_runs_the_project_venv(tmp_path):
    """`bash bench/device_check.sh` as the docs write it uses .venv/bin/python when the
    repository has one (make install made it), not a system python3 without jax."""
    import subprocess

    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "device_check.sh").write_text((ROOT / "bench" / "device_check.sh").read_text())
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.write_text('#!/usr/bin/env bash\necho "venv python $*" > ran.txt\nmkdir -p "$3"; echo ok > "$3/summary.txt"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHON"}
    proc = subprocess.run(["bash", "bench/device_check.sh", "runs/dc"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ran.txt").read_text().startswith("venv python bench/device_check.py --out runs/dc")
