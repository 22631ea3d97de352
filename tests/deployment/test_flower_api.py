"""kidneyfl's use of Flower matches the installed Flower (1.42): no deprecated
call, and the environment switches it sets are the ones Flower reads."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from common.runtime import SUPEREXEC_POLL_ENV, TELEMETRY_ENV

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("client", "server", "common", "sim", "cli", "tests/govapp")
# Deprecated in Flower 1.41/1.42 (they log "DEPRECATED FEATURE" and will go).
DEPRECATED_METHODS = {"create_message", "create_reply", "create_error_reply"}
DEPRECATED_NAMES = {"Driver", "DPFedAvgFixed", "DPFedAvgAdaptive"}
DEPRECATED_FLAGS = (
    "--appio-",
    "--auth-list-public-keys",
    "--fleet-api-",
    "--control-api-address",
    # deprecated on the SuperLink, an opt-in on a SuperNode: never wanted
    "--allow-runtime-dependency-installation",
)


def _uses(path: Path) -> list[str]:
    """Deprecated Flower calls, names and flags in one source file."""
    found = []
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and node.attr in DEPRECATED_METHODS:
            found.append(f"{where} .{node.attr}()")
        elif isinstance(node, ast.Name) and node.id in DEPRECATED_NAMES:
            found.append(f"{where} {node.id}")
        elif isinstance(node, ast.alias) and node.name in DEPRECATED_NAMES:
            found.append(f"{where} import {node.name}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith(DEPRECATED_FLAGS)
        ):
            found.append(f"{where} {node.value}")
    return found


def test_no_deprecated_flower_call_flag_or_class_in_kidneyfl():
    files = [f for pkg in PACKAGES for f in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 50
    found = [hit for f in files for hit in _uses(f)]
    assert found == [], "use the Message(...) constructor / current flags: " + (
        "; ".join(found)
    )


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text(
        "from flwr.server import Driver\n"
        "r = msg.create_error_reply(err)\n"
        "cmd = ['--appio-ssl-certfile', 'x']\n"
    )
    assert len(_uses(bad)) == 3


def test_switches_kidneyfl_sets_are_the_ones_flower_reads():
    from flwr.common.constant import FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
    from flwr.supercore import telemetry
    from flwr.supercore.superexec import run_superexec

    from sim import runner, superlink

    # The simulation SuperLink: Flower's variable and flag, both set.
    assert FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION in inspect.getsource(runner)
    assert "--disable-runtime-dependency-installation" in inspect.getsource(superlink)
    assert run_superexec._TASK_POLL_INTERVAL_ENV == SUPEREXEC_POLL_ENV
    assert f'os.getenv("{TELEMETRY_ENV}"' in inspect.getsource(telemetry)
