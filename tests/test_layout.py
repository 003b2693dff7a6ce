"""The package's layout stays honest: no import cycles between devicemap modules, and each
stage imports only the stages below it (cli -> serve -> load -> run -> plan -> model ->
devices/errors).

Imports are read with `ast` from the source (every `import` and `from ... import`, also
those inside functions and under TYPE_CHECKING), so nothing is executed.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import devicemap

PACKAGE = Path(devicemap.__file__).parent
# a stage may import its own rank and below; a new folder must be ranked here to land
RANKS = {
    "devices": 0,
    "errors": 0,
    "model": 1,
    "plan": 2,
    "run": 3,
    "load": 4,
    "serve": 5,
    "cli": 6,
}
FACADE = {"devicemap", "devicemap.__main__"}  # the public surface: imports every stage


def module_names() -> dict[str, Path]:
    """'devicemap.plan.place' -> its file, for every module and package in the source tree."""
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imported(name: str, path: Path, known: set[str]) -> Iterator[str]:
    """The devicemap modules that `name` (at `path`) imports, explicitly, anywhere in it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]  # fmt: skip
        else:
            continue
        yield from (t for t in targets if t in known and t != name)


def import_graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: set(imported(name, path, set(names))) for name, path in names.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def stage(name: str) -> str:
    return "facade" if name in FACADE else name.split(".")[1]


def rank(name: str) -> int:
    return len(RANKS) if name in FACADE else RANKS[stage(name)]


def test_the_import_graph_is_read() -> None:
    graph = import_graph()
    assert "devicemap.run.dispatch" in graph["devicemap"]
    assert "devicemap.plan.options" in graph["devicemap.plan.place"]
    assert "devicemap.model.checkpoint" in graph["devicemap.load.loader"]  # `from ..model import`


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_every_stage_is_ranked() -> None:
    stages = {stage(name) for name in import_graph() if name not in FACADE}
    assert stages <= set(RANKS), f"rank the new stage(s) {sorted(stages - set(RANKS))} in RANKS"
    assert {"model", "plan", "load", "run", "cli"} <= stages


def test_no_stage_imports_a_higher_one() -> None:
    upward = [
        f"{name} ({stage(name)}) imports {target} ({stage(target)})"
        for name, targets in import_graph().items()
        if name not in FACADE
        for target in targets
        if rank(target) > rank(name)
    ]
    assert not upward, "imports against the layout:\n" + "\n".join(sorted(upward))


def test_the_public_api_survives_importing_every_module() -> None:
    for info in pkgutil.walk_packages(devicemap.__path__, "devicemap."):
        if info.name != "devicemap.__main__":
            importlib.import_module(info.name)
    assert callable(devicemap.plan) and callable(devicemap.load)  # not the plan/, load/ stages
    assert callable(devicemap.release) and callable(devicemap.releasing)
    assert isinstance(devicemap.Plan, type) and isinstance(devicemap.Device, type)
    assert issubclass(devicemap.DoesNotFit, devicemap.DevicemapError)
    assert sorted(devicemap.__all__) == sorted(
        ["Device", "DevicemapError", "DoesNotFit", "Plan", "load", "plan", "release", "releasing"]
    )


@pytest.mark.parametrize("folder", ["model", "plan", "load", "run", "cli"])
def test_each_stage_is_a_folder_with_a_docstring(folder: str) -> None:
    init = PACKAGE / folder / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{init} says what the stage is"
