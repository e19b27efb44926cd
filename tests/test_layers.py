"""The package's layout rules (docs/design.md, "Layers"), read from the source tree.

Imports are collected with ``ast`` from every module of ``saei_fast/`` and ``kernels/``,
including the imports inside functions (a lazy import still ties two modules together), so a
new circle, an import that runs upwards, or an environment read under ``kernels/`` fails
here instead of in review.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every op: its host folder under saei_fast/ops/ and, where it has kernels of its own, the
# mirrored folder under kernels/, each with the same file names.
HOST_FILES = {"__init__.py", "op.py", "torch_path.py", "triton_path.py"}
DEVICE_FILES = {"__init__.py", "kernels.py", "config.py", "launch.py", "plans.py"}
OPS_WITH_KERNELS = ("entropy", "linear_entropy", "band")
OPS_WITHOUT_KERNELS = ("linear_loss",)  # launches linear_entropy's kernels

# Lower layers first; a module may import only from its own layer or below.
LAYERS = (
    ("saei_fast.kernels",),
    ("saei_fast.validation", "saei_fast.memory", "saei_fast.reference"),
    ("saei_fast.ops",),
    ("saei_fast.pixels",),
    ("saei_fast.attack", "saei_fast.rollout"),
    ("saei_fast.integrations",),
    ("saei_fast",),  # the package's own __init__: the public re-exports
    ("saei_fast.tools", "saei_fast.testing"),
    ("saei_fast.cli",),
)

MAX_LINES = 450


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "kernels":  # installed as saei_fast.kernels
        parts = ["saei_fast", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    files = [*ROOT.joinpath("saei_fast").rglob("*.py"), *ROOT.joinpath("kernels").rglob("*.py")]
    return {_module_name(path): path for path in files}


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
    """The saei_fast modules ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                if full in MODULES:
                    found.add(full)
                elif source in MODULES:
                    found.add(source)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{name} belongs to no layer of docs/design.md"
    return best


def test_no_import_circles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_imports_never_run_upwards():
    upward = [
        f"{name} ({LAYERS[_layer(name)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})"
        for name, deps in GRAPH.items()
        for dep in deps
        if _layer(dep) > _layer(name)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_the_library_never_imports_its_tools():
    tools = ("saei_fast.tools", "saei_fast.testing", "saei_fast.cli")
    offenders = [
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        if not name.startswith(tools)
        for dep in deps
        if dep.startswith(tools)
    ]
    assert not offenders, "\n".join(offenders)


def test_the_trainer_integrations_do_not_import_each_other():
    trl, verl = "saei_fast.integrations.trl", "saei_fast.integrations.verl"
    shared = "saei_fast.integrations.shared"
    offenders = [
        f"{name} imports {dep}"
        for name, deps in GRAPH.items()
        for dep in deps
        if (name.startswith(trl) and dep.startswith(verl))
        or (name.startswith(verl) and dep.startswith(trl))
        or (name.startswith(shared) and dep.startswith((trl, verl)))
    ]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    "name", sorted(name for name in MODULES if name.startswith("saei_fast.kernels"))
)
def test_kernels_read_no_environment(name):
    """Every opt-in choice reaches the kernels as ``KernelOptions`` from ops/dispatch.py."""
    tree = ast.parse(MODULES[name].read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    reads = [
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb")
    ]
    assert "os" not in imported, f"{name} imports os"
    assert not reads, f"{name} reads the environment ({reads})"


def test_kernels_folder_is_not_a_regular_package():
    """``kernels/__init__.py`` would shadow Hugging Face's ``kernels`` from the repo root."""
    assert not ROOT.joinpath("kernels", "__init__.py").exists()


@pytest.mark.parametrize("op", OPS_WITH_KERNELS + OPS_WITHOUT_KERNELS)
def test_every_op_has_the_same_layout(op):
    host = ROOT / "saei_fast" / "ops" / op
    assert {path.name for path in host.glob("*.py")} >= HOST_FILES, host
    device = ROOT / "kernels" / op
    if op in OPS_WITH_KERNELS:
        assert {path.name for path in device.glob("*.py")} >= DEVICE_FILES, device
    else:
        assert not device.exists(), f"{op} has no kernels of its own"


def test_files_read_in_one_sitting():
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for path in MODULES.values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, "\n".join(long)


def test_no_module_cites_the_old_design_file():
    stale = [str(p.relative_to(ROOT)) for p in MODULES.values() if "DESIGN.md" in p.read_text()]
    assert not stale, stale


def test_the_old_testing_path_still_imports_with_a_warning():
    """``saei_fast.testing`` was documented before the tools moved: it re-exports
    ``saei_fast.tools.testing`` and says where to import from instead."""
    import importlib
    import sys

    from saei_fast.tools import testing

    sys.modules.pop("saei_fast.testing", None)
    with pytest.warns(DeprecationWarning, match=r"saei_fast\.tools\.testing"):
        alias = importlib.import_module("saei_fast.testing")
    assert alias.__all__ == testing.__all__
    assert all(getattr(alias, name) is getattr(testing, name) for name in testing.__all__)
