"""The house plan, checked on the code: subpackages by layer, imports only downwards, no import circles, no private
name taken from another module (README, "Layout")."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tp3_fastai"
# Each room and the floor it stands on: a module imports only from its own room or from rooms on lower floors.
FLOORS = {"core": 0, "data": 1, "train": 1, "mnist": 2, "transfer": 2, "receptive_field": 3, "review": 4,
          "bench": 5, "report": 6, "practical": 7, "cli": 8}


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, names, line) of every `import` / `from ... import` in the file, at any depth."""
    mod, is_pkg = _module(path), path.name == "__init__.py"
    here = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if node.module is None or target == "tp3_fastai":  # `from . import x`: x is a module
                out += [(f"{target}.{n}", [], node.lineno) for n in names]
            else:
                out.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
    return [(t, n, line) for t, n, line in out if t.startswith("tp3_fastai")]


MODULES = {_module(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(target: str) -> str:
    """The module a dotted import target names (a package's __init__ for a package)."""
    while target not in MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_is_in_a_room_of_the_plan():
    rooms = {_room(m) for m in MODULES if m != "tp3_fastai"}
    assert rooms <= set(FLOORS), f"modules outside the plan's rooms: {sorted(rooms - set(FLOORS))}"


def test_imports_go_only_downwards():
    bad = []
    for mod, path in MODULES.items():
        for target, _, line in _imports(path):
            a, b = _room(mod), _room(_resolve(target))
            if a and b and a != b and FLOORS[b] >= FLOORS[a]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line} ({a}, floor {FLOORS[a]}) imports {target} "
                           f"({b}, floor {FLOORS[b]})")
    assert not bad, "imports that do not go down a floor:\n" + "\n".join(bad)


def test_no_import_circles():
    graph = {m: {_resolve(t) for t, _, _ in _imports(p)} - {m} for m, p in MODULES.items()}
    # a package's __init__ is part of every import of its modules: count the edge to the package's own modules only
    # where the __init__ itself imports them (which the graph already holds)
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{path.relative_to(PKG.parent)}:{line} imports {n} from {target}"
           for mod, path in MODULES.items() for target, names, line in _imports(path)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names taken from other modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("room", sorted(r for r in FLOORS if (PKG / r).is_dir()))
def test_every_room_says_what_it_owns(room):
    doc = ast.get_docstring(ast.parse((PKG / room / "__init__.py").read_text()))
    assert doc and len(doc) > 40, f"tp3_fastai/{room}/__init__.py: one paragraph on what the room owns"
