"""The package's shape: no import cycle among its modules (the house issue's rule)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import mas_kernels

ROOT = pathlib.Path(mas_kernels.__file__).parent


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: pathlib.Path, name: str, everywhere: bool = False) -> set[str]:
    """Package modules imported at module level (function-level imports are deliberate late binding;
    ``everywhere``: those too, and ``TYPE_CHECKING`` blocks)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) and not everywhere:
            continue  # annotations only: never imported at run time
        walk = everywhere or isinstance(node, (ast.If, ast.Try))
        nodes = [node] + (list(ast.walk(node)) if walk else [])
        for n in nodes:
            if isinstance(n, ast.Import):
                out |= {a.name for a in n.names if a.name.startswith("mas_kernels")}
            elif isinstance(n, ast.ImportFrom):
                if n.level:
                    base = package.split(".")
                    base = base[:len(base) - (n.level - 1)]
                    mod = ".".join(base + ([n.module] if n.module else []))
                else:
                    mod = n.module or ""
                if mod.startswith("mas_kernels"):
                    out.add(mod)
                    out |= {f"{mod}.{a.name}" for a in n.names}
    return out


@pytest.mark.parametrize("everywhere", [False, True], ids=["module-level", "every-import"])
def test_no_import_cycle_among_the_packages_modules(everywhere):
    """No cycle among module-level imports; and none through function-level or TYPE_CHECKING imports either
    (``estimators/rules/base.py -> plan.py`` for an annotation, ``ops/penalty.py <-> ops/triton/multi_tensor.py``
    through a dead line were such circles)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {m: {d for d in _top_level_imports(p, m, everywhere) if d in modules and d != m}
             for m, p in modules.items()}
    # a module importing a submodule of its own package's __init__ is fine; a cycle is not
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in graph[m]:
            if state.get(d) == 1 and not m.startswith(d + "."):  # importing one's parent package is not a cycle
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(modules) > 20  # the walk found the package
