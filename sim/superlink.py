"""A local SuperLink for one simulation: free 127.0.0.1 ports, stopped by PID.

Flower detaches the SuperExec, the simulation process and Ray into their own
sessions, so stopping means collecting the whole process tree first and
signalling each member (never by name).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import tomli_w

CONNECTION = "kidneyfl-sim"


class SimulationError(RuntimeError):
    """The simulation could not start or did not finish."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SuperLink:
    """A simulation SuperLink this process started and must stop."""

    process: subprocess.Popen
    http_port: int  # Fleet, Control and Runtime APIs share this port in 1.41 and 1.42
    log_file: Path | None = None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the SuperLink accepts connections; stops it and raises
        :class:`SimulationError` if it exits or does not start in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SimulationError(
                    f"flower-superlink exited with code {self.process.returncode}; "
                    f"see {self.log_file}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.http_port), 0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise SimulationError(f"flower-superlink did not start within {timeout:g} s")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the SuperLink and every process it started, by PID.

        Flower detaches the superexec, the simulation process and Ray into new
        sessions, and the simulation process outlives a killed SuperLink, so
        the whole tree is collected first and each member is signalled.
        """
        tree = descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        terminate(tree + [p for p in descendants(self.process.pid) if p not in tree])


def descendants(pid: int) -> list[int]:
    """PIDs of all live descendants of ``pid`` (Linux /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def terminate(pids: list[int], grace: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if alive(p)]
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # zombies are gone already


def bin_path(name: str) -> str:
    # Prefer the entry points next to this interpreter (the project's venv).
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def start_superlink(
    flwr_home: Path, env: Mapping[str, str], logdir: Path | None = None
) -> SuperLink:
    """Start ``flower-superlink --simulation`` on free 127.0.0.1 ports; its log
    goes to ``logdir/superlink.log`` (default: under ``flwr_home``)."""
    link = launch_superlink(flwr_home, env, logdir)
    link.wait_ready()
    return link


def launch_superlink(
    flwr_home: Path, env: Mapping[str, str], logdir: Path | None = None
) -> SuperLink:
    """:func:`start_superlink` without waiting: the process is started and
    :meth:`SuperLink.wait_ready` waits for its port (the caller can do other
    work while the SuperLink imports Flower, about 1.5 s)."""
    http = free_port()
    logdir = logdir or flwr_home / "sim-superlink"
    logdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        bin_path("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(http),
        "--disable-runtime-dependency-installation",
        "--log-file",
        str(logdir / "superlink.log"),
    ]
    proc = subprocess.Popen(
        cmd,
        env=dict(env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return SuperLink(proc, http, logdir / "superlink.log")


def write_flwr_config(flwr_home: Path, http_port: int) -> None:
    config = {
        "superlink": {
            "default": CONNECTION,
            CONNECTION: {"address": f"127.0.0.1:{http_port}", "insecure": True},
        }
    }
    (flwr_home / "config.toml").write_text(tomli_w.dumps(config))
