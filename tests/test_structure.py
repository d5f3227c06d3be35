"""The package's shape: its public names, and imports that only point down (no cycles, at
module level or deferred inside functions)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import autotune

ROOT = Path(__file__).resolve().parent.parent
#: Source folder -> the package it installs as (pyproject's package-dir).
PACKAGES = {"autotune": "autotune", "runners": "autotune.runners", "db": "autotune.db"}

PUBLIC = [
    "AutotuneError", "EngineConfig", "LoadPoint", "MAX_CONCURRENCY", "Measurement", "Outcome",
    "Recommendation", "Results", "Runner", "SLO", "Scenario", "SearchSpace", "Simulator",
    "Status", "TrialFailure", "Tuner", "UserError", "Workload", "__version__", "evaluate",
    "get_runner", "open_storage", "parse_slo",
]


def test_public_names_are_pinned_and_all_resolve():
    assert sorted(autotune.__all__) == sorted(PUBLIC)
    assert sorted(autotune._EXPORTS) == sorted(set(PUBLIC) - {"__version__"})
    for name in autotune.__all__:
        assert getattr(autotune, name) is not None, name
    with pytest.raises(AttributeError):
        autotune.NoSuchName  # noqa: B018


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    """Module -> the autotune modules it imports, at module level or inside a function (a
    deferred import is still a dependency at run time); ``if TYPE_CHECKING`` blocks aside."""
    modules = {}
    for folder in PACKAGES:
        for path in (ROOT / folder).rglob("*.py"):
            modules[_module_name(path)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        deps: set[str] = set()
        for sub in ast.walk(tree):
            if id(sub) in skip:
                continue
            if isinstance(sub, ast.ImportFrom) and sub.module:
                targets = [sub.module] + [f"{sub.module}.{a.name}" for a in sub.names]
            elif isinstance(sub, ast.Import):
                targets = [a.name for a in sub.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_module_imports_have_no_cycle():
    graph = _graph()
    assert "autotune.sweep" in graph and "autotune.model.perf" in graph
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            # A package's own __init__ importing its submodules is how it re-exports them.
            if node.startswith(dep + ".") or dep.startswith(node + "."):
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("module, absent", [
    ("autotune.recommend", ("optuna", "autotune.runners", "autotune.study")),
    ("autotune.model", ("optuna", "sqlalchemy", "autotune.runners", "autotune.db")),
    ("autotune.sweep", ("optuna", "sqlalchemy", "autotune.db")),
    ("autotune.cli", ("optuna", "pandas", "torch", "autotune.model")),
], ids=["recommend-no-optuna", "model-is-pure", "sweep-no-study", "cli-starts-light"])
def test_importing_loads_only_what_it_needs(module, absent):
    # numpy installs filters of its own on import: take the snapshot after it.
    code = (f"import sys, warnings, numpy; filters = list(warnings.filters); import {module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optuna', 'sqlalchemy', "
            "'pandas', 'torch') or m.startswith('autotune.'))); "
            "assert warnings.filters == filters, 'import changed the warning filters'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout)  # noqa: S307 - our own printed list
    for name in absent:
        assert not [m for m in loaded if m == name or m.startswith(name + ".")], (name, loaded)
