"""The import contract of llama-scalpel: layer order, no cycles, no reach into another package's privates.

Every ``import`` statement of the package is read from the source (module level, inside functions,
methods and ``try`` blocks alike; only those under ``if TYPE_CHECKING:`` are left out, as they never run),
and three rules are checked:

1. **Layers.** A module imports only from its own layer or the ones before it, never upwards, even inside
   a function::

       _core  <-  hooks  <-  analyses  <-  surgery  <-  _cli  <-  cli

2. **No cycles.** The graph of modules (one node per ``.py`` file; an import of a package's name is an
   edge to its ``__init__``, ``from pkg import submodule`` an edge to the submodule) has no cycle, inside a
   package or across packages.
3. **No private reach-ins.** A module never imports a private module (``surgery._atomic``) of another
   top-level package; ``_core`` and ``_cli`` are layers of their own and may be imported as layers allow.

Usage: ``python .ci/check_imports.py [ROOT]`` (default: the checkout holding this file). Prints one line
per broken rule with file and line, and exits 1 if there is any; prints a one-line summary and exits 0
otherwise.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

LAYERS = ("_core", "hooks", "analyses", "surgery", "_cli", "cli")  # lowest first
PUBLIC_PRIVATE = ("_core", "_cli")  # top-level packages whose names start with "_" but are layers


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the file holding the import
    imported: str  # dotted module name the import resolves to (a module or a package's __init__)
    path: Path
    line: int


def modules(root: Path) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the layers (a package is named by its ``__init__``)."""
    found: dict[str, Path] = {}
    for top in LAYERS:
        single = root / f"{top}.py"
        if single.is_file():
            found[top] = single
        package = root / top
        if not (package / "__init__.py").is_file():
            continue
        for file in sorted(package.rglob("*.py")):
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if all(p.isidentifier() for p in parts):
                found[".".join(parts)] = file
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except those in the body of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the else branch runs
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: dict[str, Path]) -> list[Import]:
    """The imports of module ``name`` that resolve to modules of the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: list[Import] = []

    def add(target: str, node: ast.stmt) -> None:
        while target and target not in known:  # `import hooks.model.x` where x is a name: the module
            target = target.rpartition(".")[0]
        if target and target != name:
            out.append(Import(name, target, path, node.lineno))

    for node in _statements(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node)
            continue
        if node.level:
            base_parts = package.split(".")
            if node.level > 1:
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            add(sub if sub in known else base, node)
    return out


def layer_of(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


def _private_reach(imp: Import) -> bool:
    top = imp.imported.split(".")[0]
    if top == imp.importer.split(".")[0]:
        return False
    parts = imp.imported.split(".")[1:]
    return any(p.startswith("_") and not p.startswith("__") for p in parts) or (
        top.startswith("_") and top not in PUBLIC_PRIVATE
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def _cycle_path(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through the first module of ``component`` (for the message)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & members):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, node, start]
            if child not in parents:
                parents[child] = node
                queue.append(child)
    return component + [start]


def check(root: Path) -> list[str]:
    """Every broken rule, one line each (empty when the contract holds)."""
    known = modules(root)
    problems: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in known}
    where: dict[tuple[str, str], Import] = {}
    for name, path in known.items():
        for imp in dict.fromkeys(imports_of(name, path, known)):  # one report per statement
            graph[name].add(imp.imported)
            where.setdefault((imp.importer, imp.imported), imp)
            rel = imp.path.relative_to(root)
            if layer_of(imp.imported) > layer_of(imp.importer):
                problems.append(
                    f"{rel}:{imp.line}: {imp.importer} imports {imp.imported}, a higher layer "
                    f"(order: {' <- '.join(LAYERS)}); move the code down or import the type under TYPE_CHECKING"
                )
            if _private_reach(imp):
                problems.append(
                    f"{rel}:{imp.line}: {imp.importer} imports the private module {imp.imported} of another "
                    "package; make what it needs public API or move it to _core"
                )
    for component in cycles(graph):
        path = _cycle_path(component, graph)
        steps = []
        for a, b in zip(path, path[1:]):
            imp = where[(a, b)]
            steps.append(f"{a} ({imp.path.relative_to(root)}:{imp.line})")
        problems.append(
            f"import cycle among {', '.join(component)}: {' -> '.join(steps)} -> {path[-1]}; "
            "break it by moving what both need into a leaf module"
        )
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    problems = check(root)
    for line in problems:
        print(line)
    if problems:
        print(f"import contract: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"import contract kept: {len(modules(root))} modules, layers {' <- '.join(LAYERS)}, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
