"""The package's import directions: lower layers never import upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ips"

# layer of each module (a package name covers its modules); imports go to lower layers, or to
# modules of the same package
LAYERS = {
    "ips.errors": 0,
    "ips.version": 0,
    "ips.dedup": 0,
    "ips.rss": 0,
    "ips.progress": 0,
    "ips.config": 2,
    "ips.files": 1,
    "ips.guard": 2,
    "ips.weights": 2,
    "ips.aggregation": 2,
    "ips.distributed": 2,
    "ips.heads": 3,
    "ips.precision": 3,
    "ips.selection": 3,
    "ips.encoders": 3,
    "ips.sources": 3,
    "ips.viz": 3,
    "ips.model": 4,
    "ips.data": 4,
    "ips.metrics": 4,
    "ips.train": 5,
    "ips.report": 5,
    "ips.features": 5,
    "ips.predict": 6,
    "ips.bench": 7,
    "ips.demo": 7,
    "ips.cli": 8,
    "ips.__main__": 9,
    "ips": 9,  # the public API re-exports
}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    name = ".".join(("ips", *parts))
    return name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """The ips modules a file imports at run time (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text())
    package = _module(path) if path.name == "__init__.py" else _module(path).rsplit(".", 1)[0]
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                found.add(f"{base}.{node.module}" if node.module else base)
            elif node.module == "ips":  # a submodule, or a name of the package itself
                for alias in node.names:
                    sub = SRC / alias.name
                    is_module = sub.with_suffix(".py").is_file() or (sub / "__init__.py").is_file()
                    found.add(f"ips.{alias.name}" if is_module else "ips")
            elif node.module and node.module.startswith("ips."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "ips")
    return found - {_module(path)}


def _layer(module: str) -> tuple[str, int]:
    """(the LAYERS key that covers ``module``, its layer)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key, LAYERS[key]
    raise KeyError(f"{module} has no layer in LAYERS")


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module(p))
def test_every_module_imports_only_lower_layers_or_its_own_package(path):
    mine, level = _layer(_module(path))
    upward = []
    for other in _imports(path):
        theirs, their_level = _layer(other)
        if theirs == mine and theirs != "ips":
            continue  # a module of the same package (sources.base and sources.tiff, say)
        if their_level >= level:
            upward.append(f"{other} (layer {their_level})")
    assert not upward, f"{_module(path)} (layer {level}) imports {', '.join(upward)}"


def test_config_errors_and_files_import_nothing_of_the_package_but_each_other():
    assert _imports(SRC / "errors.py") == set()
    assert _imports(SRC / "files.py") == {"ips.errors"}
    assert _imports(SRC / "config.py") == {"ips.errors", "ips.files"}


def test_the_model_parts_need_only_torch_and_sources_no_torch_nn():
    for name in ("selection", "aggregation", "heads", "dedup"):
        assert _imports(SRC / f"{name}.py") <= {"ips.errors", "ips.config", "ips.dedup"}, name
    for path in (SRC / "sources").glob("*.py"):  # at most torch itself, where a tensor comes in
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(name.startswith("torch.nn") for name in names), path.name
        top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        assert "torch" not in top, f"{path.name} imports torch when it is imported"


def test_nothing_imports_the_command_line():
    users = [_module(p) for p in MODULES if "ips.cli" in _imports(p)]
    assert users == ["ips.__main__"]
