"""A supervised site (issue 33): ``kidneyfl site start`` keeps its SuperNode,
executor and ClientApp processes together, says in one line when one dies,
stops them all, leaves no orphan, restarts with backoff; one port per site;
the systemd unit.

The site runs in a process of its own (``site start`` adopts orphans), with
fake SuperNode and executor commands: no SuperLink is needed, except the test
of a real ``flower-supernode`` dying for want of one.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from client.node import (
    SiteLines,
    check_clientappio_port,
    clientappio_port_problem,
    port_error,
)
from client.supervise import Backoff, Ended, duration, systemd_unit
from common.config import load_site_config
from sim.superlink import alive, descendants, free_port
from tests.fakes import write_site_yaml

PY = sys.executable
PROJECT = Path(__file__).resolve().parents[2]

# `kidneyfl site start`, the command builders replaced by $FAKE_COMMANDS.
WRAPPER = """
import argparse, json, os, sys
import client.executor as ex, client.node as node
from client.cli import register
from common.logs import setup_logging

fake = json.loads(os.environ["FAKE_COMMANDS"])
real = node.supernode_command
if fake.get("node") is not None:
    node.supernode_command = lambda site: list(fake["node"])
else:
    node.supernode_command = lambda site: [*real(site), *fake.get("node_extra", [])]
if fake.get("executor") is not None:
    ex.executor_command = lambda site: list(fake["executor"])
setup_logging()
parser = argparse.ArgumentParser()
register(parser.add_subparsers(dest="command"))
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(args.func(args))
except ValueError as exc:  # as cli/main.py
    print(f"kidneyfl site: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _py(code: str, marker: str) -> list[str]:
    """A fake process; ``marker`` finds it in /proc."""
    return [PY, "-c", f"# {marker}\n" + textwrap.dedent(code)]


SLEEPER = "import time\ntime.sleep(600)"
CLIENTAPP = "# fake-clientapp\n"
FAKE_NODE = _py(
    "import time\nprint('INFO :      SuperNode ID: 4711', flush=True)\ntime.sleep(600)",
    "fake-supernode",
)


def _spawner(then: str, marker: str) -> list[str]:
    """A process with three ClientApps, one plain, one that ignores SIGTERM,
    one that left its process group and its parent (setsid, then double fork);
    then it runs ``then``."""
    apps = [
        SLEEPER,
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "time.sleep(600)",
        "import os, time\nos.setsid()\nos.fork() and os._exit(0)\ntime.sleep(600)",
    ]
    code = "import subprocess, sys, time\n" + "".join(
        f"subprocess.Popen([sys.executable, '-c', {repr(CLIENTAPP + a)}])\n"
        for a in apps
    )
    return _py(code + then, marker)


FAKE_EXECUTOR = _spawner("time.sleep(600)", "fake-executor")


def _site(
    tmp_path: Path, approval: bool = True, port: int | None = None, warm: bool = False
) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    yml = write_site_yaml(tmp_path, "hospital-a", generate=False)
    doc = yaml.safe_load(yml.read_text())
    doc["federation"] = {
        "superlink": f"127.0.0.1:{free_port()}",  # nothing listens there
        "insecure": True,
        "clientappio_port": port or free_port(),
        "warm_clientapp": warm,
    }
    doc["governance"] = {"require_approval": approval}
    yml.write_text(yaml.safe_dump(doc))
    return yml


def _start(tmp_path: Path, yml: Path, fake: dict, *args: str) -> subprocess.Popen:
    wrapper = tmp_path / "site_start.py"
    wrapper.write_text(WRAPPER)
    env = {
        **os.environ,
        "FAKE_COMMANDS": json.dumps(fake),
        "PYTHONPATH": str(PROJECT),
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    return subprocess.Popen(
        [PY, str(wrapper), "site", "start", str(yml), "--stop-timeout", "1", *args],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=tmp_path,
    )


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _tree(proc: subprocess.Popen, markers: dict[str, int], timeout: float = 20):
    """The site's descendants once ``markers`` (name: count) are all running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in descendants(proc.pid) if alive(p)]
        found = {m: [p for p in pids if f"# {m}" in _cmdline(p)] for m in markers}
        if all(len(found[m]) >= n for m, n in markers.items()):
            return pids, found
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.1)
    raise AssertionError(f"not all of {markers} started: {found}")


def _all_gone(pids: list[int], timeout: float = 5) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@contextlib.contextmanager
def _cleanup(procs: list):
    """Kill by PID whatever a failed test left behind."""
    try:
        yield
    finally:
        for proc in procs:
            for pid in [*descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.communicate(timeout=5)


def _lines(text: str, needle: str) -> list[str]:
    return [x for x in text.splitlines() if needle in x]


# -- death of a child -------------------------------------------------------------
def test_supernode_death_is_one_line_exit_3_and_no_orphan(tmp_path):
    yml = _site(tmp_path)
    site = _start(tmp_path, yml, {"node": FAKE_NODE, "executor": FAKE_EXECUTOR})
    with _cleanup([site]):
        pids, found = _tree(
            site, {"fake-supernode": 1, "fake-executor": 1, "fake-clientapp": 3}
        )
        os.kill(found["fake-supernode"][0], signal.SIGKILL)
        assert site.wait(30) == 3
        err = site.stderr.read()
        assert _all_gone(pids) == []
    died = _lines(err, "SuperNode was killed")
    logs = load_site_config(yml).state_dir / "logs" / "supernode.log"
    assert len(died) == 1, err
    assert re.fullmatch(
        r"ERROR kidneyfl\.site: hospital-a: SuperNode was killed by SIGKILL after "
        r"[0-9.]+ s; stopping the executor and 3 ClientApp processes; see "
        + re.escape(str(logs)),
        died[0],
    ), died
    # The one that ignored SIGTERM was killed after --stop-timeout.
    assert len(_lines(err, "still running 1 s after SIGTERM; killing them")) == 1
    assert "SuperNode was killed by SIGKILL" in logs.read_text()
    assert (
        "SuperNode was killed by SIGKILL" in (logs.parent / "kidneyfl.log").read_text()
    )
    assert "connected to 127.0.0.1" in logs.read_text()  # its output was copied


def test_executor_death_stops_the_supernode_without_approval_too(tmp_path):
    # Approval on: the executor dies. Approval off: the lone SuperNode, whose
    # ClientApp processes are stopped with it.
    yml = _site(tmp_path)
    crash = _py("import sys, time\ntime.sleep(0.5)\nsys.exit(9)", "fake-executor")
    site = _start(tmp_path, yml, {"node": FAKE_NODE, "executor": crash})
    off = _site(tmp_path / "off", approval=False)
    node = _spawner("time.sleep(3)\nraise SystemExit(4)", "fake-supernode")
    lone = _start(tmp_path / "off", off, {"node": node, "executor": []})
    with _cleanup([site, lone]):
        pids, _ = _tree(lone, {"fake-clientapp": 3})
        assert site.wait(30) == 3 and lone.wait(30) == 3
        assert _all_gone(pids) == []
        err, err_off = site.stderr.read(), lone.stderr.read()
    assert len(_lines(err, "executor exited with code 9 after")) == 1, err
    assert "stopping the SuperNode;" in err
    line = _lines(err_off, "SuperNode exited with code 4")
    assert len(line) == 1 and "stopping 3 ClientApp processes;" in line[0], err_off


def test_sigterm_stops_everything_exit_0(tmp_path):
    yml = _site(tmp_path)
    site = _start(tmp_path, yml, {"node": FAKE_NODE, "executor": FAKE_EXECUTOR})
    with _cleanup([site]):
        pids, _ = _tree(
            site, {"fake-supernode": 1, "fake-executor": 1, "fake-clientapp": 3}
        )
        site.send_signal(signal.SIGTERM)
        assert site.wait(30) == 0
        assert _all_gone(pids) == []
        err = site.stderr.read()
    assert _lines(err, "SIGTERM: stopping the SuperNode, the executor and 3 ")
    assert not _lines(err, "ERROR")


def test_children_get_sigterm_when_site_start_is_killed(tmp_path):
    yml = _site(tmp_path)
    site = _start(tmp_path, yml, {"node": FAKE_NODE, "executor": _py(SLEEPER, "fe")})
    with _cleanup([site]):
        pids, _ = _tree(site, {"fake-supernode": 1, "fe": 1})
        site.kill()  # no chance to stop anything itself
        site.wait(10)
        assert _all_gone(pids, timeout=10) == []


# -- restart with backoff ---------------------------------------------------------
def test_restart_on_failure_with_growing_delays_until_sigterm(tmp_path):
    yml = _site(tmp_path)
    # Dies as Flower does when it cannot reach its SuperLink.
    node = _py(
        """
        import sys, time
        time.sleep(0.2)
        print("ERROR :     Exit Code: 305")
        print("Failed to initialize the connection to the SuperLink.", flush=True)
        sys.exit(1)
        """,
        "fake-supernode",
    )
    site = _start(
        tmp_path,
        yml,
        {"node": node, "executor": _py(SLEEPER, "fe")},
        *("--restart", "on-failure", "--restart-delay", "0.3"),
        *("--restart-max-delay", "1"),
    )
    logs = load_site_config(yml).state_dir / "logs" / "supernode.log"
    t0 = time.monotonic()
    with _cleanup([site]):
        while "restart 4 in" not in (logs.read_text() if logs.exists() else ""):
            assert site.poll() is None and time.monotonic() - t0 < 40
            time.sleep(0.1)
        pids, _ = _tree(site, {"fe": 1})
        site.send_signal(signal.SIGTERM)
        assert site.wait(30) == 0
        assert _all_gone(pids) == []
        err = site.stderr.read()
    restarts = _lines(err, ": restart ")
    delays = [re.search(r"restart (\d+) in (\S+) s", x).groups() for x in restarts]
    assert delays[:4] == [("1", "0.3"), ("2", "0.6"), ("3", "1.0"), ("4", "1.0")]
    cause = "SuperNode exited with code 1 (Flower exit code 305: Failed to "
    cause += "initialize the connection to the SuperLink.) after "
    assert all(cause in x for x in restarts), restarts
    # Each death stopped the executor before the restart.
    assert len(_lines(err, "; stopping the executor; see")) >= len(restarts)
    assert len(_lines(logs.read_text(), "started executor")) >= 4


def test_backoff_doubles_caps_and_starts_over_after_a_stable_run():
    b = Backoff(first=5, most=300, stable=3600)
    delays, d = [], None
    for _ in range(8):
        d = b.after(d, ran=10)
        delays.append(d)
    assert delays == [5, 10, 20, 40, 80, 160, 300, 300]
    assert b.after(300, ran=3600) == 5
    with pytest.raises(ValueError, match="--restart-delay"):
        Backoff(first=10, most=5)
    assert Ended("SuperNode", -9, 1).cause == "SuperNode was killed by SIGKILL"
    assert "(not stopped by kidneyfl)" in Ended("executor", 0, 1).cause
    assert [duration(s) for s in (4.24, 42, 754, 11520, 190000)] == [
        "4.2 s",
        "42 s",
        "12 min",
        "3 h 12 min",
        "2 d 4 h",
    ]


# -- a real SuperNode -------------------------------------------------------------
def test_a_real_supernode_that_gives_up_is_reported(tmp_path):
    yml = _site(tmp_path)
    site = _start(
        tmp_path,
        yml,
        {"node_extra": ["--max-retries", "0"], "executor": _py(SLEEPER, "fe")},
    )
    with _cleanup([site]):
        assert site.wait(60) == 3
        err = site.stderr.read()
    line = _lines(err, "SuperNode exited with code")
    assert len(line) == 1, err
    assert (
        "(Flower exit code 305: Failed to initialize the connection to the "
        in (line[0])
    )
    assert "stopping the executor;" in line[0]


def test_real_supernode_and_executor_killed_node_stops_the_fork_server(tmp_path):
    # The real pair, with the executor's warm fork server, started at once
    # (it is stopped while it still imports torch).
    yml = _site(tmp_path, warm=True)
    site = _start(tmp_path, yml, {})
    with _cleanup([site]):
        deadline = time.monotonic() + 50
        while time.monotonic() < deadline:
            pids = [p for p in descendants(site.pid) if alive(p)]
            cmds = {p: _cmdline(p) for p in pids}
            node = [p for p, c in cmds.items() if "flower-supernode" in c]
            if node and any("--forkserver" in c for c in cmds.values()):
                break
            assert site.poll() is None, site.communicate()[1]
            time.sleep(0.2)
        os.kill(node[0], signal.SIGKILL)
        assert site.wait(40) == 3
        assert _all_gone(pids) == []
        err = site.stderr.read()
    line = _lines(err, "SuperNode was killed by SIGKILL")
    assert (
        len(line) == 1 and "stopping the executor and 1 ClientApp process;" in (line[0])
    ), err


# -- one port per site ------------------------------------------------------------
def test_port_in_use_names_the_key_and_a_free_port(tmp_path):
    with socket.socket() as other:  # another site's SuperNode, say
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        yml = _site(tmp_path, port=port)
        site = load_site_config(yml)
        problem = clientappio_port_problem(site)
        assert f"federation.clientappio_port {port} in {yml}" in problem
        assert f"already in use on 127.0.0.1 by pid {os.getpid()}" in problem
        free = int(re.search(r"clientappio_port: (\d+) \(free now\)", problem)[1])
        assert free > port and port_error(free) == 0
        report = argparse.Namespace(findings=[], environment={})
        check_clientappio_port(site, report)
        assert [f.kind for f in report.findings] == ["setup-port"]
        proc = _start(tmp_path, yml, {"node": FAKE_NODE, "executor": []})
        assert proc.wait(30) == 2
        err = proc.stderr.read()
    assert f"federation.clientappio_port {port}" in err and "free now" in err
    assert clientappio_port_problem(site) is None  # closed: free again


def test_port_held_by_this_site_running_is_fine_for_check_not_for_start(tmp_path):
    port = free_port()
    yml = _site(tmp_path, port=port)
    site = load_site_config(yml)
    listen = (
        "import socket, sys, time\ns = socket.socket()\n"
        f"s.bind(('127.0.0.1', {port}))\ns.listen()\nprint('up', flush=True)\n"
        "time.sleep(60)"
    )
    # The SuperNode's command line names its site YAML (--node-config).
    node = subprocess.Popen(
        [PY, "-c", listen, f'site-config="{site.source}"'], stdout=subprocess.PIPE
    )
    with _cleanup([node]):
        assert node.stdout.readline() == b"up\n"
        assert "already running (pid" in clientappio_port_problem(site)
        assert clientappio_port_problem(site, running_ok=True) is None
        report = argparse.Namespace(findings=[], environment={})
        check_clientappio_port(site, report)
        assert (
            not report.findings and "usable" in report.environment["clientappio_port"]
        )


# -- what the site's log says ----------------------------------------------------------
def test_site_lines_round_when_flower_gives_it_and_flower_exit_reason():
    lines = SiteLines("hospital-a", "the SuperLink")
    out = [
        lines.feed(x)
        for x in (
            "INFO :      [RUN 77, ROUND 3]",
            "INFO :      Receiving: train message (ID: abc)",
            "INFO :      [RUN 77]",  # Flower's strategies give no round
            "INFO :      Receiving: evaluate message (ID: def)",
            "\x1b[91mERROR \x1b[0m:     Exit Code: 305",
            "Failed to initialize the connection to the SuperLink.",
            "[Errno 111] Connection refused",
        )
    ]
    assert [x for x in out if x] == [
        "hospital-a: train request arrived (round 3)",
        "hospital-a: evaluate request arrived",
    ]
    assert lines.flower_exit == (
        "Flower exit code 305: Failed to initialize the connection to the SuperLink."
    )


# -- the service ----------------------------------------------------------------------
@pytest.mark.parametrize("backoff", ["systemd", "kidneyfl"])
def test_systemd_unit_restarts_with_backoff_by_absolute_paths(tmp_path, backoff):
    from client.cli import register

    yml = _site(tmp_path)
    unit = tmp_path / "kidneyfl-site-hospital-a.service"
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["site", "service", str(yml), "--write", str(unit), "--backoff", backoff]
    )
    assert args.func(args) == 0
    text = unit.read_text()
    assert text == systemd_unit(load_site_config(yml), getpass.getuser(), backoff)
    keys = dict(
        line.split("=", 1)
        for line in text.splitlines()
        if "=" in line and not line.startswith("#")
    )
    exec_start = keys["ExecStart"].split()
    assert Path(exec_start[0]).is_absolute() and Path(exec_start[0]).exists()
    assert exec_start[1:4] == ["site", "start", str(yml.resolve())]
    assert keys["Restart"] == "on-failure"
    assert keys["RestartPreventExitStatus"] == "2"
    assert keys["KillMode"] == "mixed" and keys["TimeoutStopSec"] == "35s"
    if backoff == "systemd":
        assert keys["RestartSec"] == "5s" and keys["RestartMaxDelaySec"] == "300s"
        assert keys["RestartSteps"] == "6" and "--restart" not in exec_start
    else:
        assert "--restart on-failure" in keys["ExecStart"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    res = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [
        x
        for x in res.stderr.splitlines()
        if str(unit) in x
        and not re.search(r"Unknown key (name )?'Restart(Steps|MaxDelaySec)'", x)
    ]
    assert complaints == [], res.stderr
