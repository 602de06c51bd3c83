"""The pipeline's shape: one entry point per stage, no import cycles, nothing imported upward, one reset.

The import graph is read from the package's source (every ``import`` and ``from ... import``,
module level and inside functions), so a cycle cannot hide in a function body.
"""
import ast
from pathlib import Path

import pytest
import torch

import jitkern

PKG = Path(jitkern.__file__).resolve().parent

#: Imports inside functions that are allowed, and why (none of them dodges a cycle).
LAZY_OK = {
    ("jitkern.ops", "jitkern.torch_ops"): "torch is imported on first op access, not by `import jitkern.ops`",
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, dict[str, bool]]:
    """module -> {imported jitkern module: imported inside a function}"""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, dict[str, bool]] = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text())
        edges: dict[str, bool] = {}

        def visit(node, inner):
            for child in ast.iter_child_nodes(node):
                nested = inner or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets = []
                if isinstance(child, ast.ImportFrom):
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    if child.level:
                        base = base[:len(base) - (child.level - 1)]
                        mod = ".".join(base + ([child.module] if child.module else []))
                    else:
                        mod = child.module or ""
                    for a in child.names:
                        full = f"{mod}.{a.name}"
                        targets.append(full if full in mods else mod)
                elif isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                for t in targets:
                    if t in mods and t != name and not (t == "jitkern" and child.__class__ is ast.ImportFrom
                                                        and all(a.name == "__version__" for a in child.names)):
                        edges[t] = edges.get(t, True) and nested
                visit(child, nested)

        visit(tree, False)
        graph[name] = edges
    return graph


def test_no_import_cycles():
    graph = import_graph()
    seen, stack, cycles = set(), [], []

    def dfs(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in graph.get(m, {}):
            dfs(t)
        stack.pop()

    for m in sorted(graph):
        dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_intra_package_import_hides_in_a_function():
    graph = import_graph()
    hidden = sorted((m, t) for m, edges in graph.items() for t, inner in edges.items()
                    if inner and (m, t) not in LAZY_OK and m != "jitkern")
    assert not hidden, f"imports inside functions (move them to the top of the module): {hidden}"


def test_stage_entry_points_live_in_their_modules():
    from jitkern import build, dispatch, load, plan, runtime

    assert plan.plan.__module__ == "jitkern.plan"
    assert build.get_entry.__module__ == "jitkern.build"
    assert load.load.__module__ == "jitkern.load"
    assert runtime.kernel.__module__ == "jitkern.runtime"
    assert dispatch.dispatcher.__module__ == "jitkern.dispatch"
    # the stages below never reach up to the ones above them
    graph = import_graph()
    order = ["jitkern.plan", "jitkern.build", "jitkern.load", "jitkern.runtime", "jitkern.fallback", "jitkern.dispatch"]
    for i, lower in enumerate(order):
        reach, todo = set(), [lower]
        while todo:
            m = todo.pop()
            for t in graph.get(m, {}):
                if t not in reach:
                    reach.add(t)
                    todo.append(t)
        assert not reach & set(order[i + 1:]), f"{lower} imports a later stage: {reach & set(order[i + 1:])}"


def test_errors_a_caller_catches_are_exported():
    for name in ("OverBudgetError", "RecordedBuildFailure", "UnavailableError", "NoVariantError", "BuildError",
                 "LaunchError", "ConfigError", "InputError", "CacheError"):
        assert issubclass(getattr(jitkern, name), jitkern.JitkernError)
    assert jitkern.select_arch is jitkern.runtime.select_arch


def test_reset_clears_all_process_state(cache_dir):
    from jitkern import logs

    x = torch.randn(3, 64)
    jitkern.ops.rms_norm(x, torch.ones(64))
    logs.warn_once(("test", "reset"), "jitkern: a warning")
    d = jitkern.dispatcher(jitkern.get_op("rms_norm"))
    assert d.signatures == 1 and jitkern.stats()["compiles"] == 1 and ("test", "reset") in logs._seen
    jitkern.reset()
    assert d.signatures == 0 and jitkern.stats()["compiles"] == 0 and ("test", "reset") not in logs._seen
    assert not jitkern.runtime._kernels
    jitkern.ops.rms_norm(x, torch.ones(64))  # decided and loaded afresh, from the disk cache
    assert jitkern.stats()["disk_hits"] == 1 and jitkern.stats()["compiles"] == 0


@pytest.mark.parametrize("bad", ["eps_nan", "eps_negative", "eps_inf"])
def test_per_call_scalars_are_checked_on_every_call(bad):
    x = torch.randn(3, 64)
    w = torch.ones(64)
    jitkern.ops.rms_norm(x, w, eps=1e-6)  # decided with a good eps
    eps = {"eps_nan": float("nan"), "eps_negative": -1.0, "eps_inf": float("inf")}[bad]
    with pytest.raises(jitkern.ArgumentError, match="eps"):
        jitkern.ops.rms_norm(x, w, eps=eps)
