"""The archlab.* namespace maps the fixed top-level folders (every subpackage listed); test tools are an extra."""
import ast
import importlib
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# each top-level folder and the layers below it that it may import
LAYERS = {"kernels": set(), "archs": {"kernels"}, "train": {"kernels", "archs"},
          "compare": {"kernels", "archs", "train"}}


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_listed_in_pyproject():
    setuptools = _pyproject()["tool"]["setuptools"]
    folders = {f"archlab.{p.parent.relative_to(ROOT).as_posix().replace('/', '.')}"
               for top in LAYERS for p in (ROOT / top).rglob("__init__.py")}
    assert folders == set(setuptools["packages"])
    assert setuptools["package-dir"] == {f"archlab.{top}": top for top in LAYERS}


@pytest.mark.parametrize("package", sorted(_pyproject()["tool"]["setuptools"]["packages"]))
def test_subpackage_imports_from_its_folder(package):
    module = importlib.import_module(package)
    top = package.split(".")[1]
    assert Path(module.__file__).resolve().is_relative_to(ROOT / top)


def _archlab_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {m.split(".")[1] for m in names if re.match(r"archlab\.\w+", m)}


@pytest.mark.parametrize("top", sorted(LAYERS))
def test_imports_flow_one_way(top):
    """kernels <- archs <- train <- compare: no layer imports one above it, not even inside a function (the
    command line, which dispatches to every layer, is compare/cli.py for that reason)."""
    for path in (ROOT / top).rglob("*.py"):
        bad = _archlab_imports(path) - LAYERS[top] - {top}
        assert not bad, f"{path.relative_to(ROOT)} imports archlab.{bad.pop()}"


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower() for requirement in requirements}


def test_test_tools_are_an_extra_that_dev_py_installs():
    """pytest and hypothesis are not what archlab needs to run, only what its tests need: the `test` extra, which
    the README's `python3 dev.py test` installs."""
    project = _pyproject()["project"]
    assert not _names(project["dependencies"]) & {"pytest", "hypothesis"}
    assert {"pytest", "hypothesis"} <= _names(project["optional-dependencies"]["test"])
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    assert dev.ARCHLAB_REQUIREMENT == ".[test]"
