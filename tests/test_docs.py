"""The documentation stays true: the site builds in strict mode, the public API resolves,
and every command and Python snippet of README.md and docs/ is run from the pages.

Convention (see docs/development.md, "Documentation that stays true"):
- a ```bash block holds commands, a ```python block a snippet; other fences (json, text)
  are not run;
- commands written inline in prose (a code span starting with `python `, `qinco-`, `make `
  or `bash `) are commands too;
- a block that cannot run on tiny data is preceded by `<!-- not-run: reason -->`: the
  reason is required, and the blocks are counted and listed by
  test_not_run_blocks_are_few_and_explained;
- every command is run through its program's own argument parsing (the parser must accept
  every flag shown, spelled in full: no abbreviations), or run.py's key=value parsing, or
  for `make` the Makefile's targets (and DEMO_ARGS through the main job's parser); and
  tests/test_docs_run.py then runs them, page by page, on tiny stand-ins;
- every snippet runs, whole, in a scratch folder holding tiny stand-ins for the files the
  pages name (`data/my_vectors/`: a folder data set from the test fixtures;
  `models/my_ivf_model.pt`: the fixture IVF-QINCo model), and imports only `qinco_jax`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_layout import entry_points

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# docs/_pending_*.md: text waiting for code not merged yet, outside the site (mkdocs.yml exclude_docs)
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if not p.name.startswith("_pending_"))]
NOT_RUN = re.compile(r"<!--\s*not-run:(.*?)-->")
FENCE = re.compile(r"^(\s*)```(\w*)")
INLINE_COMMAND = re.compile(r"(?:python3? |qinco-[\w-]+|make |bash )")
MAX_NOT_RUN = 12  # blocks that cannot run here (downloads, GPUs, other clusters); keep it small


@dataclasses.dataclass(frozen=True)
class Block:
    page: Path
    line: int            # 1-based line of the opening fence (or of the inline span)
    lang: str            # "bash", "python", ... ("inline" for a command in prose)
    text: str
    not_run: str | None  # the reason given by <!-- not-run: reason -->, or None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, and its inline commands."""
    lines = page.read_text().split("\n")
    blocks, prose = [], []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        start, lang = i, m.group(2)
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = NOT_RUN.search(lines[k]) if k >= 0 else None
        body = "\n".join(ln[len(m.group(1)):] if ln.startswith(m.group(1)) else ln for ln in lines[start + 1:j])
        blocks.append(Block(page, start + 1, lang, body, mark.group(1).strip() if mark else None))
        prose.append((start + 1, ""))
        i = j + 1
    text = "\n".join(ln for _, ln in prose)
    line_of = [n for n, ln in prose for _ in range(len(ln) + 1)]
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        span = " ".join(m.group(1).split())
        if INLINE_COMMAND.match(span):
            blocks.append(Block(page, line_of[m.start()], "inline", span, None))
    return blocks


ALL_BLOCKS = [b for page in PAGES for b in page_blocks(page)]
COMMAND_BLOCKS = [b for b in ALL_BLOCKS if b.lang in ("bash", "inline") and b.not_run is None]
SNIPPETS = [b for b in ALL_BLOCKS if b.lang == "python" and b.not_run is None]


# --------------------------------------------------------------------------------------
# Commands: words as the shell makes them, then each program's own parsing
# --------------------------------------------------------------------------------------


def command_lines(text: str) -> list[str]:
    """Logical lines (backslash continuations joined), comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [ln for ln in joined.split("\n") if ln.strip() and not ln.lstrip().startswith("#")]


def shell_words(line: str) -> list[str]:
    """The words bash makes of the line (quotes, $((...)), $(...), globs and comments as a
    shell would; the loop variable i of the sharded-encoding example is 0)."""
    if re.search(r"(?<![\\$])(&&|\|\||;|\|)", line.split(" #")[0]):
        raise AssertionError(f"{line!r}: one command per line in a runnable block (no ;, &&, |)")
    out = subprocess.run(["bash", "-c", "i=0; printf '%s\\0' " + line], capture_output=True, text=True, check=True)
    return [w for w in out.stdout.split("\0")[:-1]]


def documentation_words(words: list[str]) -> list[str]:
    """Optional parts written [--flag value] count as given; a trailing '...' is prose."""
    out = []
    for w in words:
        if w.startswith("["):  # opens an optional part
            w = w[1:]
        if w.count("]") > w.count("["):  # closes one (a value such as [10,20] stays whole)
            w = w[:-1]
        if w and w != "...":
            out.append(w)
    return out


class _Parsed(Exception):
    pass


def check_argparse(parser: argparse.ArgumentParser, args: list[str], where: str,
                   parse=argparse.ArgumentParser.parse_args, exact: bool = True) -> None:
    """The parser accepts args, and (exact) every option is spelled in full: argparse
    would also take an unambiguous prefix, which only the reference's own lines may use."""
    try:
        parse(parser, args)
    except SystemExit as e:
        if e.code == 0 and set(args) & {"-h", "--help"}:
            return
        raise AssertionError(f"{where}: {parser.prog} refuses {' '.join(args)!r}") from e
    known = set(parser._option_string_actions)
    for w in args if exact else ():
        flag = w.split("=", 1)[0]
        if flag.startswith("-") and not re.fullmatch(r"-\d.*", flag):
            assert flag in known, f"{where}: {parser.prog} has no option {flag!r} (abbreviated?)"


def check_script_parses(script: Path, args: list[str], where: str) -> None:
    """A script that builds its parser inside main() (the benchmarks): run it up to its
    parse_args, which is checked, then stopped."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, a=None, namespace=None):
        check_argparse(self, args, where, parse=original)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    saved = sys.argv
    try:
        sys.argv = [str(script), *args]
        runpy.run_path(str(script), run_name="__main__")
        raise AssertionError(f"{where}: {script.name} never parsed its arguments")
    except _Parsed:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = saved


def shim_module(script: Path) -> str:
    """The qinco_jax.cli module a shim script (train/, search/, convert/, run.py) runs."""
    tree = ast.parse(script.read_text())
    return next(n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))


# The reference's script names (run from its folder), by the shim here that keeps the name.
REFERENCE_SCRIPTS = {p.name: p for folder in ("train", "search", "convert") for p in (ROOT / folder).glob("*.py")}


def optional_dependencies() -> list[str]:
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return re.findall(r"^(\w+)\s*=", section, re.M)


def check_program(module: str, args: list[str], where: str, exact: bool = True) -> None:
    if module == "qinco_jax.cli.run":
        from qinco_jax.cli.run_config import parse_run_args

        if args in ([], ["--help"], ["-h"]):
            return
        try:
            parse_run_args(args)
        except ValueError as e:
            raise AssertionError(f"{where}: run.py refuses {' '.join(args)!r}: {e}") from e
        return
    check_argparse(importlib.import_module(module).build_parser(), args, where, exact=exact)


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))


@dataclasses.dataclass(frozen=True)
class Program:
    """What a documented command runs (`resolve`)."""

    kind: str              # "main" (a qinco_jax.cli module's main), "script" (run as __main__), "srun"
    target: str            # the module, or the script's path
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    # the reference's own line (`python train_qinco.py ...`): it may abbreviate options as
    # argparse allows; not part of the identity (the shim's line runs the same program)
    reference_spelling: bool = dataclasses.field(default=False, compare=False)


def resolve(words: list[str], where: str) -> Program:
    """The program a command runs: VAR=value prefixes become its environment, `srun ...
    python X` runs X (one process here), the reference's script names their shims here,
    installed commands their modules, `make demo` the main job with its DEMO_ARGS.
    AssertionError for anything else."""
    env = []
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        env.append(tuple(words[0].split("=", 1)))
        words = words[1:]
    assert words, f"{where}: empty command"
    kind = "main"
    if words[0] == "srun":  # a cluster launcher starting one process per node
        words = words[next(i for i, w in enumerate(words) if w.startswith("python")):]
        kind = "srun"
    prog, args, env = words[0], words[1:], tuple(env)
    if prog in ("python", "python3"):
        if args[:1] == ["-m"]:
            assert args[1].startswith("qinco_jax.cli."), f"{where}: python -m {args[1]} is not a program of qinco_jax"
            return Program(kind, args[1], tuple(args[2:]), env)
        reference = "/" not in args[0] and args[0] in REFERENCE_SCRIPTS  # the reference's line, as it writes it
        script = REFERENCE_SCRIPTS[args[0]] if reference else ROOT / args[0]
        assert script.is_file(), f"{where}: no script {args[0]}"
        if script.parent.name == "bench" or kind == "srun":
            return Program("script" if kind == "main" else kind, str(script), tuple(args[1:]), env, reference)
        return Program(kind, shim_module(script), tuple(args[1:]), env, reference)
    if prog == "./run.sh":  # the QINCo2 reference's accelerate launcher of run.py
        return Program(kind, "qinco_jax.cli.run", tuple(args), env)
    scripts = entry_points()
    if prog in scripts:
        return Program(kind, scripts[prog].split(":")[0], tuple(args), env)
    if prog == "make" and args[:1] == ["demo"]:
        variables = dict(w.split("=", 1) for w in args if "=" in w)
        out = variables.get("DEMO_OUT", "runs/demo")
        return Program(kind, "qinco_jax.cli.main_job", ("--out", out, *variables.get("DEMO_ARGS", "").split()), env)
    raise AssertionError(f"{where}: {' '.join(words)!r} is not a command of this project; "
                         f"mark the block <!-- not-run: reason --> if it cannot run here")


def check_command(words: list[str], where: str) -> None:
    words = documentation_words(words)
    lead = 0  # VAR=value prefixes
    while lead < len(words) and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[lead]):
        lead += 1
    assert lead < len(words), f"{where}: empty command"
    prog, args = words[lead], words[lead + 1:]
    if prog == "pip" and args[:1] == ["install"]:
        extras = {e for w in args for m in re.finditer(r"^\.\[([\w,]+)\]?$", w) for e in m.group(1).split(",")}
        missing = extras - set(optional_dependencies())
        assert not missing, f"{where}: pyproject.toml has no extra {missing}"
        return
    if prog == "make":
        variables = dict(w.split("=", 1) for w in args if "=" in w)
        targets = [w for w in args if "=" not in w]
        assert set(targets) <= makefile_targets(), f"{where}: no make target {set(targets) - makefile_targets()}"
        if "DEMO_ARGS" in variables:
            check_program("qinco_jax.cli.main_job", variables["DEMO_ARGS"].split(), where)
        return
    if prog == "bash":
        assert (ROOT / args[0]).is_file() and args[0].startswith("bench/"), f"{where}: no script {args[0]}"
        return
    program = resolve(words, where)
    exact = not program.reference_spelling
    if program.target.endswith(".py"):  # a benchmark (parsed up to its parse_args), or the script srun starts
        script = Path(program.target)
        if script.parent.name == "bench":
            return check_script_parses(script, list(program.args), where)
        return check_program(shim_module(script), list(program.args), where, exact=exact)
    return check_program(program.target, list(program.args), where, exact=exact)


@pytest.mark.parametrize("block", COMMAND_BLOCKS, ids=lambda b: b.where)
def test_documented_commands_parse(block: Block):
    lines = command_lines(block.text)
    assert lines, f"{block.where}: an empty command block"
    for line in lines:
        if block.lang == "inline" and (re.search(r"<\w+>|\.\.\.", line) or " " not in line.strip()):
            continue  # a pattern (`python run.py task=<task> ...`) or a bare program name, not a command
        check_command(shell_words(line), block.where)


def test_the_command_checker_catches_what_it_should():
    """A renamed flag, an abbreviation, an unknown run.py key and an unknown make target
    each fail; the documented forms pass."""
    check_command(["python", "search/search_ivf.py", "--todo", "search", "--nthreads", "4"], "ok")
    check_command(["python", "search_ivf.py", "--todo", "search", "--nthread", "4"], "the reference's own line")
    check_command(["pip", "install", "-e", ".[cpu,test]", "torch==2.13.0"], "ok")
    for bad in (["python", "search/search_ivf.py", "--todo", "search", "--nthread", "4"],
                ["python", "train/train_qinco.py", "--no_such_flag"],
                ["python", "run.py", "task=eval", "no_such_key=1"],
                ["qinco-run", "task=eval", "db=bigann1M", "db=deep1M"],
                ["make", "no-such-target"],
                ["make", "demo", "DEMO_ARGS=--no_such_flag 1"],
                ["pip", "install", "-e", ".[no_such_extra]"],
                ["./run.sh", "task=train", "no_such_key=1"],
                ["wget", "https://example.com/x"]):
        with pytest.raises(AssertionError):
            check_command(bad, "bad")


def test_not_run_blocks_are_few_and_explained():
    skipped = [b for b in ALL_BLOCKS if b.not_run is not None]
    for b in skipped:
        assert b.not_run, f"{b.where}: <!-- not-run: --> needs a reason"
        print(f"not run: {b.where} ({b.lang}): {b.not_run}")
    assert len(skipped) <= MAX_NOT_RUN, [b.where for b in skipped]
    assert COMMAND_BLOCKS and SNIPPETS


# --------------------------------------------------------------------------------------
# Python snippets: run whole on tiny stand-ins
# --------------------------------------------------------------------------------------


def snippet_imports(code: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


@pytest.mark.parametrize("block", SNIPPETS, ids=lambda b: b.where)
def test_snippets_import_only_the_public_api(block: Block):
    import qinco_jax

    for name in snippet_imports(block.text):
        assert name in ("qinco_jax", "numpy"), f"{block.where}: imports {name}: use `import qinco_jax` only"
    for node in ast.walk(ast.parse(block.text)):
        if isinstance(node, ast.ImportFrom) and node.module == "qinco_jax":
            assert {a.name for a in node.names} <= set(qinco_jax.__all__), block.where
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("qj", "qinco_jax"):
            assert node.attr in qinco_jax.__all__, f"{block.where}: {node.value.id}.{node.attr} is not public"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    """The files the pages name, tiny: a folder data set (the fixture vectors, d=32) and an
    IVF-QINCo model (the reference's IVF64 fixture, M=4 K=256)."""
    root = tmp_path_factory.mktemp("stand_ins")
    data = root / "data" / "my_vectors"
    data.mkdir(parents=True)
    np.save(data / "learn.npy", np.load(FIXTURES / "ivf_xt.npy")[:3000])
    np.save(data / "base.npy", np.load(FIXTURES / "ivf_xb.npy")[:2000])
    np.save(data / "query.npy", np.load(FIXTURES / "ivf_xq.npy")[:100])
    (root / "models").mkdir()
    shutil.copy(FIXTURES / "ivf_qinco_d32_IVF64_M4_K256_L1_h32.pt", root / "models" / "my_ivf_model.pt")
    return root


@pytest.mark.parametrize("block", SNIPPETS, ids=lambda b: b.where)
def test_snippets_run(block: Block, stand_ins: Path, tmp_path: Path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(stand_ins, work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("QINCO_DATA", str(work / "data"))
    t0 = time.time()
    exec(compile(block.text, block.where, "exec"), {"__name__": "__snippet__"})
    print(f"{block.where}: {time.time() - t0:.1f} s")


# --------------------------------------------------------------------------------------
# The public API and the site
# --------------------------------------------------------------------------------------


def test_public_api_resolves_and_import_is_cheap():
    code = ("import sys, qinco_jax\n"
            "heavy = [m for m in ('jax', 'faiss', 'flax', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "for name in qinco_jax.__all__: getattr(qinco_jax, name)\n"
            "assert 'jax' in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)


def test_public_api_table_docstring_and_type_stubs_agree():
    import qinco_jax

    exported = set(qinco_jax.__all__) - {"__version__"}
    doc_words = set(re.findall(r"\b\w+\b", qinco_jax.__doc__))
    assert exported <= doc_words, f"not in the docstring: {exported - doc_words}"
    tree = ast.parse((ROOT / "qinco_jax" / "__init__.py").read_text())
    stub = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))
    typed = {}
    for node in ast.walk(stub):
        if isinstance(node, ast.ImportFrom):
            typed.update({a.asname or a.name: (node.module, a.name) for a in node.names})
    assert typed == qinco_jax._EXPORTS
    page = (ROOT / "docs" / "api" / "index.md").read_text()
    assert {n for n in exported if f"::: qinco_jax.{n}\n" not in page} == set(), "missing from docs/api/index.md"


def test_readme_is_short_and_shows_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.split("\n")) < 250
    assert "make demo" in text and "make test" in text and "docs/main_job_pareto.png" in text


def test_readme_links_resolve():
    """The README is not part of the site (mkdocs checks the pages' links): its own links
    into docs/ are checked here, anchors included."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", text)
    local = [link for link in links if not link.startswith("http")]
    assert local
    for link in local:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links to {link}: no such file"
        if anchor:
            headings = [re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                        for h in re.findall(r"^#+ (.*)$", target.read_text(), re.M)]
            assert anchor in headings, f"README links to {link}: no such heading"


def test_docs_build_strict(tmp_path):
    """The site builds with every link and docstring reference resolved, offline."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    html = (tmp_path / "site" / "api" / "index.html").read_text()
    assert 'id="qinco_jax.QincoIndex"' in html and 'id="qinco_jax.encode"' in html
    assert "fonts.googleapis.com" not in (tmp_path / "site" / "index.html").read_text()
