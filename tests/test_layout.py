"""The package's import rules (STYLE.md, "the orchestration layer"), read from the source with ``ast``.

1. No import circle between the package's modules.
2. ``analysis/`` reads reports and checkpoints: none of its modules reaches the training loop, not
   even through other modules (studies that train editors live in ``experiments/``).
3. Library modules never import a command module. Command modules are the ones that parse a
   subcommand's arguments and run it: ``cli.py`` (which assembles them) and the ``commands/`` package.

Every import counts, also one inside a function; ``from package import module`` counts as an import
of that module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "instructedit"
TRAINING_LOOP = "instructedit.training"
COMMAND_MODULES = {"instructedit.cli", "instructedit.commands"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The package's modules that the file at ``path`` (module ``name``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, name, set(paths)) for name, path in paths.items()}


def is_command_module(name: str) -> bool:
    return name in COMMAND_MODULES or name.startswith("instructedit.commands")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_graph_sees_the_package() -> None:
    graph = import_graph()
    assert TRAINING_LOOP in graph and "instructedit.experiments.scaling" in graph
    assert "instructedit.objective" in graph[TRAINING_LOOP]
    assert "instructedit.commands.memory" in graph["instructedit.cli"]  # a function-level import would count as well
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a"}}, "a") == {"b", "c"}


def test_no_import_circle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_analysis_never_reaches_the_training_loop() -> None:
    graph = import_graph()
    offenders = sorted(name for name in graph if name.startswith("instructedit.analysis.") and TRAINING_LOOP in reachable(graph, name))
    assert not offenders, f"{offenders} reach {TRAINING_LOOP} through their imports; analysis reads reports and checkpoints (STYLE.md)"


def test_library_modules_never_import_a_command_module() -> None:
    graph = import_graph()
    assert all(name in graph for name in COMMAND_MODULES), "a command module was renamed: update COMMAND_MODULES"
    offenders = sorted(f"{name} -> {imported}" for name, targets in graph.items() if not is_command_module(name)
                       for imported in targets if is_command_module(imported))
    assert not offenders, f"library modules import command modules: {offenders}"


def test_only_command_modules_build_parsers() -> None:
    """The command line lives in one place: argparse parsers are built in ``cli.py`` and ``commands/`` only."""
    builders = {"add_parser", "add_argument", "add_subparsers", "ArgumentParser"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if is_command_module(name):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in builders:
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"argument parsing outside the command modules: {offenders}"
