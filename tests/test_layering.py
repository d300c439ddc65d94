"""The house's layers: every import of vtp_jax inside the package (in functions too) points down
or sideways, never up, and no modules import each other in a circle.

Read from the source with `ast`, so nothing is imported and a lazy import cannot hide. An import
inside a function is allowed only with a `# lazy:` comment that says which heavy optional
dependency it keeps out of the import of its module.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vtp_jax"

# Top to bottom; a module may import its own layer and those below. The first name of a module's
# path inside vtp_jax decides its layer (vtp_jax/jobs/dit.py -> "jobs").
LAYERS = (
    ("main", "reconstruct", "__init__"),  # entry points and the public API
    ("jobs",),
    ("train",),  # runner, optim
    ("evals",),
    ("objectives",),
    ("pretrained", "checkpoints"),
    ("config",),
    ("data", "models"),
    ("images", "paths", "sharding", "sampling"),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports():
    """(importer, imported module, line, in a function, the line's text) for every vtp_jax import."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = path.read_text()
        lines = src.splitlines()
        tree = ast.parse(src)
        importer = _module_name(path)
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        in_function.add(id(inner))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from vtp_jax.x import y` may name a module y: count the deeper one when it exists.
                for a in node.names:
                    deeper = f"{node.module}.{a.name}"
                    is_module = (PACKAGE.parent / deeper.replace(".", "/")).with_suffix(".py").exists() or \
                        (PACKAGE.parent / deeper.replace(".", "/") / "__init__.py").exists()
                    targets.append(deeper if is_module else node.module)
            for t in targets:
                if t == "vtp_jax" or t.startswith("vtp_jax."):
                    out.append((importer, t, node.lineno, id(node) in in_function, lines[node.lineno - 1]))
    return out


IMPORTS = _imports()


def test_every_module_has_a_layer():
    modules = {_layer(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert modules <= set(RANK), f"modules without a layer in LAYERS: {sorted(modules - set(RANK))}"


def test_no_import_runs_back_up():
    up = [f"{a}:{line} imports {b} ({_layer(a)} is below {_layer(b)})"
          for a, b, line, _, _ in IMPORTS if b != "vtp_jax" and RANK[_layer(b)] < RANK[_layer(a)]]
    assert not up, "imports that run back up the layers:\n" + "\n".join(up)


def test_package_root_is_imported_only_by_entry_points():
    """`import vtp_jax` pulls in the public API (load_pretrained, ...): only the layer above may."""
    bad = [f"{a}:{line}" for a, b, line, _, _ in IMPORTS if b == "vtp_jax" and RANK[_layer(a)] > 0]
    assert not bad, "modules below the entry points import the package root: " + ", ".join(bad)


def test_no_circles():
    graph = {}
    for a, b, *_ in IMPORTS:
        if a != b and b != "vtp_jax":
            graph.setdefault(a, set()).add(b)
    # A module imports its package's __init__ first: an import of vtp_jax.x.y depends on vtp_jax.x.
    for a in list(graph):
        for b in list(graph[a]):
            parent = b.rsplit(".", 1)[0]
            if parent != "vtp_jax" and not a.startswith(parent + ".") and a != parent:
                graph[a].add(parent)
    state, cycle = {}, []

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycle.append(stack[stack.index(m):] + [m] if m in stack else [n, m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycle, "import circles: " + "; ".join(" -> ".join(c) for c in cycle)


def test_in_function_imports_say_why():
    bad = [f"{a}:{line}: {text.strip()}" for a, _, line, inside, text in IMPORTS if inside and "# lazy:" not in text]
    assert not bad, "in-function imports of vtp_jax without a '# lazy: <reason>' comment:\n" + "\n".join(bad)


@pytest.mark.parametrize("importer,imported,expect_up", [("vtp_jax.models.vtp", "vtp_jax.checkpoints", True),
                                                         ("vtp_jax.jobs.dit", "vtp_jax.train.runner", False)])
def test_the_rule_itself(importer, imported, expect_up):
    """The check catches what it should (a model importing checkpoints) and passes what it should."""
    assert (RANK[_layer(imported)] < RANK[_layer(importer)]) == expect_up
