"""The package's shape: no import cycles, counting imports made inside functions too.

A cycle held apart by a function-local import works until someone moves that import to the
top, so every `import` statement anywhere in a module counts as an edge.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "rlcsd_jax"


def module_files() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_edges(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (top level or inside functions).

    `from pkg import name` points at `pkg.name` when that is a module, else at `pkg` itself."""
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                    found.append(sorted(component))
    return found


def test_the_package_has_no_import_cycle():
    edges = import_edges(module_files())
    found = cycles(edges)
    detail = ["  " + " <-> ".join(c) + ": " + "; ".join(
        f"{a} imports {b}" for a in c for b in sorted(edges[a] & set(c))) for c in found]
    assert not found, "import cycles (function-local imports count):\n" + "\n".join(detail)


def test_the_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path):
    """The checker itself: a two-module cycle whose back edge is function-local is reported."""
    (tmp_path / "a.py").write_text("from pkg import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg import a\n    return a\n")
    modules = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    assert cycles(import_edges(modules)) == [["pkg.a", "pkg.b"]]
    (tmp_path / "b.py").write_text("import json\n")
    assert cycles(import_edges(modules)) == []


def test_no_library_module_imports_an_entry_point():
    """Entry points (`python -m rlcsd_jax.X`) sit on top; nothing in the library imports them."""
    entry_points = {"rlcsd_jax.train", "rlcsd_jax.evaluate", "rlcsd_jax.convert", "rlcsd_jax.plan",
                    "rlcsd_jax.plot", "rlcsd_jax.analyze_style"}
    edges = import_edges(module_files())
    offenders = sorted(f"{m} imports {t}" for m, ts in edges.items() if m not in entry_points
                       for t in ts & entry_points)
    assert not offenders, offenders


# Lower layers never import higher ones: data flows data -> inference / sampling -> rewards ->
# hints -> scoring -> losses -> trainer -> analysis.  The planner and the trainer share a layer:
# the planner compiles the trainer's programs, the trainer checks their memory with it.
LAYERS = (
    ("cli", "distributed"),
    ("data", "models"),
    ("inference",),
    ("sampling",),
    ("rewards",),
    ("hints",),
    ("scoring",),
    ("losses",),
    ("planner", "trainer"),
    ("analysis",),
    ("train", "evaluate", "convert", "plan", "plot", "analyze_style"),
)


def layer_of(module: str) -> int:
    """Index in LAYERS of the top-level part of `rlcsd_jax.<part>...` (-1: the package itself)."""
    parts = module.split(".")
    if len(parts) == 1:
        return -1
    for i, names in enumerate(LAYERS):
        if parts[1] in names:
            return i
    raise AssertionError(f"{module}: add rlcsd_jax.{parts[1]} to a layer in LAYERS")


def test_imports_flow_from_lower_layers_to_higher_ones():
    edges = import_edges(module_files())
    upward = sorted(f"{a} imports {b}" for a, targets in edges.items() for b in targets
                    if layer_of(b) > layer_of(a))
    assert not upward, "a module imports one of a higher layer:\n" + "\n".join(upward)
