"""The layers a hospital's reviewer relies on: what the site runs imports only
the site and the shared code, and the bundle it approves holds no simulation.

``client -> common <- server``; ``sim/`` and ``cli/`` may import all three;
nothing in ``client/``, ``server/`` or ``common/`` imports ``sim/`` or ``cli/``,
and no module imports itself back through others (imports inside functions
count: they run too).
"""

from __future__ import annotations

import ast
import zipfile
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "common", "sim", "cli")
ALLOWED = {
    "client": {"client", "common"},
    "server": {"server", "common"},
    "common": {"common"},
    "sim": set(PACKAGES) - {"cli"},
    "cli": set(PACKAGES),
}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its body."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                # `import a.b.c` also runs a and a.b: the longest known prefix
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return _imports(_modules())


def test_no_import_goes_against_the_layers(graph):
    against = sorted(
        f"{src} imports {dst}"
        for src, dsts in graph.items()
        for dst in dsts
        if dst.split(".")[0] not in ALLOWED[src.split(".")[0]]
    )
    assert against == []


def test_no_import_cycles(graph):
    assert _cycles(graph) == []


def test_the_checker_sees_cycles_and_arrows_inside_functions():
    # the checks above could pass by seeing nothing: they must see these
    edges = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "b": {"a.x"}}
    assert _cycles(edges) == [["a.x", "a.y", "a.z"]]
    mods = _modules()
    graph = _imports(mods)
    # sim/runner.py imports server.deliver inside a function only
    assert "server.deliver" in graph["sim.runner"]


@pytest.mark.slow
def test_the_bundle_a_hospital_approves_holds_no_simulation_code(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    from sim.runner import stage_app

    staged = stage_app(tmp_path / "app", ROOT)
    fab = tmp_path / "app.fab"
    fab.write_bytes(build_fab_from_disk(staged))
    names = zipfile.ZipFile(fab).namelist()
    tops = {n.split("/")[0] for n in names if "/" in n}
    assert tops >= {"client", "common", "server"}
    assert not tops & {"sim", "cli", "tests", "benchmarks", "docs"}, sorted(tops)
    # the apps the bundle names load from the bundle alone
    assert "client/app.py" in names and "server/app.py" in names


# Modules allowed to import Flower, and why (docs/architecture.md, "Flower only
# where Flower is the point"). A new entry needs a reason there.
FLOWER_MODULES = {
    # the two apps and the extra message rounds the ServerApp sends on the Grid
    "client.app",
    "server.app",
    "server.preprocessing_round",
    "server.finetune",
    "server.clinical_round",
    # the strategy wrapper: a Flower Strategy reading Flower's replies in place
    "server.strategy.wrapper",
    "server.strategy.aggregators",
    "server.strategy.round_sites",
    "server.strategy.reply_filter",
    "server.strategy.guard",
    "server.strategy.updates",
    "server.strategy.capped_mean",
    "server.strategy.replies",
    # the site's gate and executor wrap Flower's ClientApp runner and SuperExec
    "client.gate",
    "client.edge",
    "client.executor",
    # packing a model into an ArrayRecord, inside functions only
    "common.packing",
    # launchers: Flower's migration chain; the bundle's files as flwr builds them;
    # Flower's SuperLink app behind the hospitals' Fleet-only listener
    "server.superlink_db",
    "server.fleet_gate",
    "sim.runner",
}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _flower_importers() -> set[str]:
    """Modules that import Flower when they run (anywhere in their body)."""
    out = set()
    for name, path in _modules().items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_only(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            if "flwr" in roots:
                out.add(name)
    return out


def test_flower_is_imported_only_where_flower_is_the_point():
    importers = _flower_importers()
    assert importers - FLOWER_MODULES == set(), "document why in architecture.md"
    # the list stays true: an entry that no longer imports Flower goes too
    assert FLOWER_MODULES - importers == set()


def test_the_report_side_of_the_coordinator_is_flower_free():
    importers = _flower_importers()
    reporting = {m for m in _modules() if m.startswith("server.reporting")}
    assert reporting, "server/reporting/ is where the report lives"
    assert importers & reporting == set()
