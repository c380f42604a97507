"""contrib/check-imports: cycles, layers and the engine's public API, on small made-up
packages, and on dmfs itself."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from importlib.machinery import SourceFileLoader
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "contrib" / "check-imports"
#: the cycle the lint tier allows until the engine's split removes it
def load_checker() -> ModuleType:
    loader = SourceFileLoader("check_imports", str(SCRIPT))
    spec = importlib.util.spec_from_loader("check_imports", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_imports"] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


checker = load_checker()


def package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package ``dmfs`` under ``tmp_path`` made of ``files`` (path -> source);
    every directory gets an ``__init__.py`` (empty unless given)."""
    top = tmp_path / "dmfs"
    for name, source in {"__init__.py": "", "pool/__init__.py": "__all__ = []\n",
                         **files}.items():
        path = top / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    for directory in [top, *[p for p in top.rglob("*") if p.is_dir()]]:
        (directory / "__init__.py").touch()
    return top


def problems(top: Path, **kwargs: object) -> list[str]:
    return checker.check(top, **kwargs).problems


def test_a_clean_package_passes(tmp_path: Path) -> None:
    top = package(tmp_path, {
        "units.py": "SECTOR = 512\n",
        "config.py": "from dmfs.units import SECTOR\n",
        "pool/__init__.py": """\
            from dmfs.pool.engine import Engine
            __all__ = ["Engine"]
            """,
        "pool/engine.py": """\
            from dmfs.config import SECTOR
            from dmfs.pool import dm
            from . import dm as again
            class Engine: ...
            """,
        "pool/dm.py": "import dmfs.units\n",
        "fuse/view.py": "from dmfs.pool import Engine\nimport dmfs.pool\n",
        "cli/__init__.py": "from dmfs.cli.main import main\n",
        "cli/main.py": "from dmfs.cli import view_command\nfrom dmfs.fuse import view\n"
                       "def main(): ...\n",
        "cli/view_command.py": "from dmfs.cli.common import x\n",
        "cli/common.py": "import os\nx = 1\n",
    })
    report = checker.check(top)
    assert report.problems == []
    assert report.notes == []
    assert report.modules == 12


def test_a_cycle_names_every_import_that_makes_it(tmp_path: Path) -> None:
    top = package(tmp_path, {"a.py": "import dmfs.b\n", "b.py": "\n\nfrom dmfs import c\n",
                             "c.py": "from dmfs.a import thing\n"})
    assert problems(top) == [
        "import cycle: dmfs.a -> dmfs.b -> dmfs.c -> dmfs.a"
        "\n    dmfs/a.py:1: dmfs.a imports dmfs.b"
        "\n    dmfs/b.py:3: dmfs.b imports dmfs.c"
        "\n    dmfs/c.py:1: dmfs.c imports dmfs.a"]


def test_imports_in_functions_and_under_type_checking_count(tmp_path: Path) -> None:
    top = package(tmp_path, {
        "a.py": """\
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from dmfs.b import B
            """,
        "b.py": """\
            class B:
                def method(self):
                    from dmfs.a import helper
            """})
    [cycle] = problems(top)
    assert "dmfs/a.py:3: dmfs.a imports dmfs.b (under TYPE_CHECKING)" in cycle
    assert "dmfs/b.py:3: dmfs.b imports dmfs.a (inside a function)" in cycle


def test_a_cycle_through_a_package_init(tmp_path: Path) -> None:
    """config imports pool.drivers, which runs pool/__init__.py, which imports the
    engine, which imports config: the interpreter fails when config comes first."""
    top = package(tmp_path, {
        "config.py": "from dmfs.units import x\n",
        "units.py": "from dmfs.pool.drivers import DRIVERS\nx = 1\n",
        "pool/__init__.py": "from dmfs.pool.engine import Engine\n__all__ = ['Engine']\n",
        "pool/engine.py": "from dmfs.config import x\nclass Engine: ...\n",
        "pool/drivers.py": "DRIVERS = ()\n"})
    found = problems(top)
    assert found[0] == (
        "import cycle: dmfs.config -> dmfs.units -> dmfs.pool -> dmfs.pool.engine -> dmfs.config"
        "\n    dmfs/config.py:1: dmfs.config imports dmfs.units"
        "\n    dmfs/units.py:1: dmfs.units imports dmfs.pool.drivers, which runs dmfs.pool"
        "\n    dmfs/pool/__init__.py:1: dmfs.pool imports dmfs.pool.engine"
        "\n    dmfs/pool/engine.py:1: dmfs.pool.engine imports dmfs.config")
    assert found[1:] == ["dmfs/units.py:1: dmfs.units imports dmfs.pool.drivers: a shared "
                         "module imports an engine module"]


def test_siblings_under_an_init_that_imports_them_are_no_cycle(tmp_path: Path) -> None:
    """A module's own packages are already being imported when it runs."""
    top = package(tmp_path, {
        "pool/__init__.py": "from dmfs.pool.a import A\nfrom dmfs.pool.b import B\n"
                            "__all__ = ['A', 'B']\n",
        "pool/a.py": "from dmfs.pool import b\nfrom dmfs.pool.b import B\nclass A: ...\n",
        "pool/b.py": "from . import c\nclass B: ...\n",
        "pool/c.py": "import dmfs.pool.dm\n",
        "pool/dm.py": ""})
    assert problems(top) == []


def test_a_name_taken_from_an_enclosing_package_is_a_dependency(tmp_path: Path) -> None:
    """``from dmfs.pool import A`` inside the pool needs __init__ to have bound A."""
    top = package(tmp_path, {
        "pool/__init__.py": "from dmfs.pool.b import B\nfrom dmfs.pool.a import A\n"
                            "__all__ = ['A', 'B']\n",
        "pool/a.py": "class A: ...\n",
        "pool/b.py": "from dmfs.pool import A\nclass B: ...\n"})
    [cycle] = problems(top)
    assert cycle.startswith("import cycle: dmfs.pool -> dmfs.pool.b -> dmfs.pool\n")


def test_the_allowed_cycle_is_a_note_and_must_stay_exactly_as_allowed(tmp_path: Path) -> None:
    files = {"pool/a.py": "from dmfs.pool import b\n",
             "pool/b.py": "def f():\n    from dmfs.pool import a\n"}
    allowed = [frozenset({"dmfs.pool.a", "dmfs.pool.b"})]
    report = checker.check(package(tmp_path / "1", files), allowed)
    assert report.problems == []
    assert report.notes[0].startswith("allowed cycle (--allow-cycle): dmfs.pool.a -> "
                                      "dmfs.pool.b -> dmfs.pool.a\n")
    grown = {**files, "pool/b.py": "from dmfs.pool import c\n", "pool/c.py":
             "from dmfs.pool import a\n"}
    assert [p.splitlines()[0] for p in problems(package(tmp_path / "2", grown),
                                                  allowed_cycles=allowed)] == [
        "import cycle: dmfs.pool.a -> dmfs.pool.b -> dmfs.pool.c -> dmfs.pool.a",
        "--allow-cycle dmfs.pool.a,dmfs.pool.b: there is no such cycle (any more, or it "
        "grew): drop the allowance"]
    gone = {"pool/a.py": "", "pool/b.py": "from dmfs.pool import a\n"}
    assert problems(package(tmp_path / "3", gone), allowed_cycles=allowed) == [
        "--allow-cycle dmfs.pool.a,dmfs.pool.b: there is no such cycle (any more, or it "
        "grew): drop the allowance"]


@pytest.mark.parametrize(("importer", "source"), [
    ("pool/engine.py", "from dmfs.fuse import view\n"),
    ("pool/engine.py", "import dmfs.cli.main\n"),
    ("pool/engine.py", "from ..grpc import server\n"),  # a front end this file never named
    ("config.py", "from dmfs.pool import Engine\n"),
    ("units.py", "from dmfs.cli import main\n"),
])
def test_no_module_imports_a_layer_above_its_own(tmp_path: Path, importer: str,
                                                 source: str) -> None:
    top = package(tmp_path, {
        "pool/__init__.py": "from dmfs.pool.engine import Engine\n__all__ = ['Engine']\n",
        "pool/engine.py": "class Engine: ...\n", "fuse/view.py": "", "cli/main.py": "",
        "grpc/server.py": "", "config.py": "", "units.py": ""})
    path = top / importer
    path.write_text(path.read_text() + source)
    [problem] = problems(top)
    lower = "an engine" if importer.startswith("pool/") else "a shared"
    higher = "an engine" if "dmfs.pool " in source else "a front-end"
    assert problem.startswith(f"dmfs/{importer}:")
    assert problem.endswith(f": {lower} module imports {higher} module")


ENGINE_FILES = {
    "pool/__init__.py": """\
        from dmfs.pool.engine import Engine
        from dmfs.pool import fs
        __all__ = ["Engine", "fs"]
        """,
    "pool/engine.py": "class Engine: ...\nclass Private: ...\n",
    "pool/fs.py": "", "pool/dm.py": "",
}


@pytest.mark.parametrize(("source", "expected"), [
    ("from dmfs.pool import Engine, fs\nimport dmfs.pool\n", None),
    ("from dmfs.pool.engine import Engine\n", "dmfs.fuse.view imports dmfs.pool.engine: a "
     "private engine module; import what it needs from dmfs.pool"),
    ("import dmfs.pool.dm\n", "dmfs.fuse.view imports dmfs.pool.dm: a private engine module"),
    ("from dmfs.pool import dm\n", "dmfs.fuse.view imports dmfs.pool.dm: a private engine "
     "module"),
    ("from ..pool import engine\n", "dmfs.fuse.view imports dmfs.pool.engine: a private"),
    ("from dmfs.pool import Private\n", "dmfs.fuse.view imports dmfs.pool name 'Private': not "
     "in the engine's public API (__all__ of dmfs/pool/__init__.py)"),
])
def test_front_ends_use_only_the_public_engine_api(tmp_path: Path, source: str,
                                                    expected: str | None) -> None:
    top = package(tmp_path, {**ENGINE_FILES, "fuse/view.py": source})
    found = problems(top)
    if expected is None:
        assert found == []
    else:
        [problem] = found
        assert problem.startswith("dmfs/fuse/view.py:1: ")
        assert expected in problem


def test_a_private_module_may_be_allowed_for_a_front_end(tmp_path: Path) -> None:
    top = package(tmp_path, {**ENGINE_FILES, "fuse/view.py": "from dmfs.pool.dm import x\n",
                             "cli/main.py": "from dmfs.pool.dm import x\n"})
    allowed = {("dmfs.fuse", "dmfs.pool.dm"): "the reason"}
    [problem] = problems(top, allowed_private=allowed)
    assert problem.startswith("dmfs/cli/main.py:1: dmfs.cli.main imports dmfs.pool.dm: a private")


def test_the_public_api_must_be_a_list_of_names_the_init_binds(tmp_path: Path) -> None:
    top = package(tmp_path, {"pool/__init__.py": "from dmfs.pool.engine import Engine\n"
                                                 "__all__ = ['Engine', 'Gone']\n",
                             "pool/engine.py": "class Engine: ...\n"})
    assert problems(top) == [f"{top / 'pool' / '__init__.py'}: __all__ lists 'Gone', which it "
                             f"neither imports nor defines"]
    (top / "pool" / "__init__.py").write_text("__all__ = names()\n")
    with pytest.raises(checker.UsageError, match="__all__ is not a literal list of names"):
        checker.check(top)


def test_the_command_line_exit_status_and_summary(tmp_path: Path) -> None:
    top = package(tmp_path, {"a.py": "import dmfs.b\n", "b.py": "import dmfs.a\n"})
    run = [sys.executable, str(SCRIPT)]
    failed = subprocess.run([*run, str(top)], capture_output=True, text=True, check=False)
    assert failed.returncode == 1
    assert failed.stdout.splitlines()[-1] == ("check-imports: 4 modules, 2 imports between "
                                              "them: 1 problem(s)")
    allowed = subprocess.run([*run, "--allow-cycle", "dmfs.a,dmfs.b", str(top)],
                             capture_output=True, text=True, check=False)
    assert allowed.returncode == 0, allowed.stdout
    assert allowed.stdout.splitlines()[-1].endswith(": no cycle but the allowed one, layers "
                                                    "kept, the engine used through its public "
                                                    "API")
    missing = subprocess.run([*run, str(tmp_path / "nothing")], capture_output=True,
                             text=True, check=False)
    assert (missing.returncode, missing.stderr) == (
        2, f"check-imports: {tmp_path / 'nothing'} is not a package (no __init__.py)\n")


# ---- dmfs itself ---------------------------------------------------------------------


def test_dmfs_keeps_its_architecture() -> None:
    report = checker.check(ROOT / "dmfs", [])
    assert report.problems == []


def test_the_cli_common_module_imports_no_command() -> None:
    modules = checker.find_modules(ROOT / "dmfs")
    imported = {i.target for i in checker.imports_of(modules["dmfs.cli.common"], modules, "dmfs")}
    assert not {name for name in imported if name.startswith("dmfs.cli")}


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """What the package-__init__ rule is about, checked by the interpreter itself."""
    names = sorted(n for n in checker.find_modules(ROOT / "dmfs") if n != "dmfs.__main__")
    script = textwrap.dedent(f"""\
        import importlib, sys
        for name in {names!r}:
            for loaded in [m for m in sys.modules if m == "dmfs" or m.startswith("dmfs.")]:
                del sys.modules[loaded]
            importlib.import_module(name)
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            check=False, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_an_import_of_a_module_that_does_not_exist_is_a_problem(tmp_path: Path) -> None:
    # A moved module leaves lazy imports behind that only fail when they run.
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def later():\n    from pkg.moved import thing\n")
    report = checker.check(package, [])
    assert [p for p in report.problems if "there is no such module" in p]
