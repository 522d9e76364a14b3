"""The package layout's rules, checked on the source: `router/` imports nothing from `serving/` (nor Ray,
outside its one adapter), and no two modules of either package import each other, directly or in a loop."""

from __future__ import annotations

import ast
from pathlib import Path

from router.contracts import ReplicaStats, Role, RouteFeedback

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("router", "serving")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports (module level or inside functions; TYPE_CHECKING-only ones excluded)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    known = {_module(p) for p in files}
    graph = {}
    for p in files:
        mod = _module(p)
        # A package's __init__ is imported with any of its modules; it is not an edge of the module.
        graph[mod] = {m for m in _imports(p, known) if m != mod and not mod.startswith(m + ".")}
    return graph


def test_router_imports_nothing_from_serving_and_ray_only_in_its_adapter() -> None:
    for path in (ROOT / "router").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            for m in mods:
                assert not m.startswith("serving"), f"{path.name} imports {m}"
                if path.name != "serve_adapter.py":
                    assert not m.startswith("ray"), f"{path.name} imports {m}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[mod] = 2
        return None

    for mod in sorted(graph):
        if mod not in state and (found := visit(mod)):
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_see_imports_and_cycles(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("import b\nif TYPE_CHECKING:\n    import c\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    known = {"a", "b", "c"}
    assert _imports(tmp_path / "a.py", known) == {"b"}
    assert _imports(tmp_path / "b.py", known) == {"a"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_replica_stats_round_trip_and_defaults() -> None:
    s = ReplicaStats(Role.PREFILL, running=3, waiting=2, kv_usage=0.5, ts=12.5, kv_events="tcp://h:1")
    assert ReplicaStats.from_dict(s.as_dict(), Role.PREFILL) == s
    # The router's role wins (one router per pool); a replica that has not reported is idle and stale.
    assert ReplicaStats.from_dict(s.as_dict(), Role.DECODE).role is Role.DECODE
    assert ReplicaStats.from_dict(None, Role.DECODE) == ReplicaStats(Role.DECODE)
    assert ReplicaStats.from_dict({"running": "4", "kv_events": ""}, Role.DECODE).running == 4
    assert ReplicaStats.from_dict({"kv_events": ""}, Role.DECODE).kv_events is None
    assert RouteFeedback(None, 0.5).matched_blocks is None
