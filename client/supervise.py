"""Keeping a site's processes together: the supervisor in ``kidneyfl site start``.

The SuperNode and (with approval on) the gate executor run as children of
``kidneyfl site start``, each leading its own process group, and that process
makes itself a *child subreaper* (Linux), so whatever they start (the
executor's fork server and ClientApp processes), even once orphaned, stays
below it; each child also gets SIGTERM if ``kidneyfl site start`` itself
dies. Then:

- SIGTERM, SIGINT or SIGHUP stop the whole tree: SIGTERM to every process,
  SIGKILL to any left after ``stop_timeout`` (a second signal: at once).
  Exit code :data:`EXIT_STOPPED` (0).
- When the SuperNode or the executor ends on its own, one line says which, how
  (exit code, with Flower's own exit code and reason from its output, or the
  signal that killed it), after how long, what else is being stopped and where
  the log is; the rest is stopped as above and the exit code is
  :data:`EXIT_PROCESS_ENDED` (3), for systemd's or Docker's restart policy.
- With a :class:`Backoff` (``--restart on-failure``) the site is started again
  instead, after 5 s, 10 s, 20 s ... at most 5 min; the delay starts over
  once the site has run an hour. Each restart is one line.

:func:`systemd_unit` writes the service file for ``kidneyfl site service``.
Top-level imports are the standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.node import LoggedProcess
    from common.config import SiteConfig

EXIT_STOPPED = 0  # stopped on request (SIGTERM, SIGINT, SIGHUP)
EXIT_CONFIG = 2  # nothing started: the YAML or the host is not right (cli/main.py)
EXIT_PROCESS_ENDED = 3  # the SuperNode or the executor ended on its own
STOP_TIMEOUT = 20.0  # seconds between SIGTERM and SIGKILL
_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

log = logging.getLogger("kidneyfl.site")


@dataclass(frozen=True)
class Backoff:
    """Delays between restarts: ``first``, doubling up to ``most`` seconds,
    back to ``first`` after a run of at least ``stable`` seconds."""

    first: float = 5.0
    most: float = 300.0
    stable: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.most:
            raise ValueError(
                f"restart delays: need 0 < first ({self.first:g} s) <= most "
                f"({self.most:g} s); see --restart-delay and --restart-max-delay"
            )

    def after(self, delay: float | None, ran: float) -> float:
        """The next delay, given the previous one (None: none yet) and how
        long the site ran before it ended."""
        if delay is None or ran >= self.stable:
            return self.first
        return min(delay * 2, self.most)


@dataclass(frozen=True)
class Ended:
    """A child that ended on its own."""

    name: str  # "SuperNode" or "executor"
    returncode: int
    ran: float  # seconds
    flower: str = ""  # Flower's "Exit Code: N" and reason, from its output

    @property
    def cause(self) -> str:
        """``SuperNode exited with code 1 (Flower exit code 305: ...)``."""
        if self.returncode < 0:
            return f"{self.name} was killed by {_signal_name(-self.returncode)}"
        why = f" ({self.flower})" if self.flower else ""
        if self.returncode == 0 and not why:
            why = " (not stopped by kidneyfl)"
        return f"{self.name} exited with code {self.returncode}{why}"


class Supervisor:
    """Start a site's processes, watch them, stop them together.

    Parameters
    ----------
    site : SiteConfig
        Names the site in its lines and holds its log directory.
    children : sequence of (name, command)
        Started in this order, each in its own process group
        (:func:`client.node.start_logged`).
    env : dict
        Their environment.
    stop_timeout : float
        Seconds from SIGTERM to SIGKILL.
    ready : callable, optional
        Returns why the site cannot start now (e.g. its port is taken), or None.
        Checked before every start: before the first it raises ``ConfigError``,
        before a restart it defers the restart.

    The process running it owns every process below it (it adopts orphans):
    run it in a process of its own, as ``kidneyfl site start`` does.
    """

    def __init__(
        self,
        site: SiteConfig,
        children: Sequence[tuple[str, list[str]]],
        env: dict[str, str],
        stop_timeout: float = STOP_TIMEOUT,
        ready: Callable[[], str | None] | None = None,
    ) -> None:
        self.site = site
        self.children = list(children)
        self.env = env
        self.stop_timeout = stop_timeout
        self.ready = ready
        self._signal: int | None = None  # the stop signal received, if any
        self._hurry = False  # a second signal: kill at once

    def run(self, backoff: Backoff | None = None) -> int:
        """Run until stopped (0) or, without ``backoff``, until a child ends (3).

        Raises
        ------
        ConfigError
            If ``ready`` says the site cannot start.
        """
        from common.config import ConfigError

        if self.ready is not None and (problem := self.ready()):
            raise ConfigError(problem)
        from common.logs import LOG_FILE, add_log_file, remove_log_file

        adopt_orphans()
        before = list(logging.getLogger("kidneyfl").handlers)
        handler = add_log_file(self.site.state_dir / "logs" / LOG_FILE)
        previous = {s: signal.signal(s, self._on_signal) for s in _STOP_SIGNALS}
        try:
            code = self._loop(backoff)
            if code == EXIT_STOPPED:
                self._say(logging.INFO, "stopped")
            return code
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            if handler not in before:
                remove_log_file(handler)

    def _loop(self, backoff: Backoff | None) -> int:
        delay: float | None = None
        restarts = 0
        while True:
            ended = self._run_once()
            if ended is None:
                return EXIT_STOPPED
            if backoff is None:
                return EXIT_PROCESS_ENDED  # said in the line about it
            restarts += 1
            delay = backoff.after(delay, ended.ran)
            self._say(
                logging.WARNING,
                f"restart {restarts} in {duration(delay)} ({ended.cause} after "
                f"{duration(ended.ran)})",
            )
            while True:
                if self._sleep(delay):
                    return EXIT_STOPPED
                problem = self.ready() if self.ready is not None else None
                if problem is None:
                    break
                delay = backoff.after(delay, 0.0)
                self._say(
                    logging.WARNING,
                    f"restart {restarts} deferred {duration(delay)}: {problem}",
                )

    def _run_once(self) -> Ended | None:
        """Start the children; return the one that ended, or None if stopped."""
        from client.node import start_logged

        procs: list[LoggedProcess] = []
        try:
            for name, cmd in self.children:
                if self._signal is not None:
                    break
                procs.append(start_logged(cmd, self.env, self.site, name=name))
            while self._signal is None:
                ended = next((p for p in procs if p.poll() is not None), None)
                if ended is not None:
                    return self._ended(ended, procs)
                reap_orphans({p.pid for p in procs})
                time.sleep(0.1)
            self._say(
                logging.INFO,
                f"{_signal_name(self._signal)}: stopping {self._rest(procs, None)}",
            )
            return None
        finally:
            self._stop(procs)

    def _ended(self, proc: LoggedProcess, procs: list[LoggedProcess]) -> Ended:
        proc.copier.join(1.0)  # its last words before ours
        ended = Ended(
            proc.name,
            int(proc.returncode or 0),
            time.monotonic() - proc.started,
            proc.lines.flower_exit,
        )
        logs = self.site.state_dir / "logs" / "supernode.log"
        self._say(
            logging.ERROR,
            f"{ended.cause} after {duration(ended.ran)}; stopping "
            f"{self._rest(procs, proc)}; see {logs}",
        )
        return ended

    def _rest(self, procs: list[LoggedProcess], gone: Any) -> str:
        """What is left to stop, in words."""
        names = [f"the {p.name}" for p in procs if p is not gone and p.poll() is None]
        others = len(process_tree(procs)) - len(names)
        if others:
            names.append(f"{others} ClientApp process{'es' if others > 1 else ''}")
        if not names:
            return "nothing else (none left running)"
        return " and ".join([", ".join(names[:-1]), names[-1]] if names[1:] else names)

    def _stop(self, procs: list[LoggedProcess]) -> None:
        """SIGTERM to the whole tree, SIGKILL to what is left after the timeout."""
        signal_tree(procs, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while process_tree(procs) and time.monotonic() < deadline and not self._hurry:
            reap_orphans({p.pid for p in procs})
            time.sleep(0.1)
        if left := process_tree(procs):
            when = (
                "after a second signal"
                if self._hurry
                else f"{self.stop_timeout:g} s after SIGTERM"
            )
            self._say(
                logging.WARNING,
                f"{len(left)} process(es) still running {when}; killing them "
                f"(pid {' '.join(map(str, left))})",
            )
        for _ in range(100):  # again: a process may fork while being killed
            if not signal_tree(procs, signal.SIGKILL):
                break
            reap_orphans({p.pid for p in procs})
            time.sleep(0.05)
        else:  # e.g. stuck in the kernel (D state) on a dead network share
            left = process_tree(procs)
            self._say(logging.ERROR, f"could not kill pid {' '.join(map(str, left))}")
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            p.copier.join(2.0)
        reap_orphans(set())

    def _sleep(self, seconds: float) -> bool:
        """Wait; True as soon as a stop signal arrives."""
        deadline = time.monotonic() + seconds
        while self._signal is None and time.monotonic() < deadline:
            reap_orphans(set())
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        if self._signal is not None:
            self._say(logging.INFO, f"{_signal_name(self._signal)}: not restarting")
        return self._signal is not None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._signal is not None:
            self._hurry = True
        self._signal = signum

    def _say(self, level: int, text: str) -> None:
        """One line: the site's logger (terminal, kidneyfl.log), supernode.log."""
        from client.node import site_note

        line = f"{self.site.name}: {text}"
        log.log(level, "%s", line)
        site_note(self.site, line)


def adopt_orphans() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans(tracked: set[int]) -> None:
    """Collect exited children this process adopted (never a tracked one:
    ``Popen`` reads those exit codes)."""
    if not hasattr(os, "waitid"):
        return
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in tracked:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, process group, state) from /proc (empty elsewhere)."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            table[int(stat.parent.name)] = (int(fields[1]), int(fields[2]), fields[0])
        except (OSError, IndexError, ValueError):
            continue
    return table


def process_tree(procs: Sequence[subprocess.Popen]) -> list[int]:
    """Live pids of the site: the children, their process groups, their
    descendants and the orphans this process adopted (zombies excluded)."""
    table = _proc_table()
    me, roots = os.getpid(), {p.pid for p in procs}
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)
    found = {p.pid for p in procs if p.returncode is None and p.poll() is None}
    found |= {pid for pid, (_, group, _) in table.items() if group in roots}
    found |= {pid for pid in kids.get(me, []) if pid not in roots}  # adopted
    todo = list(found | roots)
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    found.discard(me)
    return sorted(p for p in found if p in table and table[p][2] != "Z")


def signal_tree(procs: Sequence[subprocess.Popen], sig: int) -> list[int]:
    """Send ``sig`` to every live pid of the site's tree; returns them."""
    pids = process_tree(procs)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    return pids


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3 h 12 min``, ``2 d 4 h``."""
    s = int(round(seconds))
    if seconds < 10:
        return f"{seconds:.1f} s"
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min" + (f" {s % 60} s" if s < 600 and s % 60 else "")
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


# -- the service file (kidneyfl site service) -----------------------------------
SYSTEMD_BACKOFF = 254  # first systemd with RestartSteps= and RestartMaxDelaySec=


def systemd_version() -> int | None:
    """This host's systemd version, or None (no systemd)."""
    try:
        out = subprocess.run(
            ["systemctl", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.match(r"systemd (\d+)", out)
    return int(m.group(1)) if m else None


def kidneyfl_command() -> list[str]:
    """This installation's ``kidneyfl``, by absolute path (never via PATH)."""
    # sys.executable unresolved: a venv's bin/python is a symlink out of it.
    exe = Path(os.path.abspath(sys.executable))
    script = exe.parent / "kidneyfl"
    return [str(script)] if script.is_file() else [str(exe), "-m", "cli.main"]


def systemd_unit(
    site: SiteConfig,
    user: str,
    backoff: str = "systemd",
    stop_timeout: float = STOP_TIMEOUT,
    command: list[str] | None = None,
) -> str:
    """The systemd service file that keeps ``kidneyfl site start`` running.

    Parameters
    ----------
    backoff : {"systemd", "kidneyfl"}
        ``systemd``: systemd restarts the site after a failure, 5 s doubling to
        5 min (``RestartSteps=``, ``RestartMaxDelaySec=``: systemd 254 or
        later). ``kidneyfl``: for older systemd, ``site start --restart
        on-failure`` restarts with the same backoff itself (reset after an
        hour's run), and systemd restarts only ``kidneyfl`` itself.
    """
    import shlex

    if backoff not in ("systemd", "kidneyfl"):
        raise ValueError(f"backoff must be systemd or kidneyfl, not {backoff!r}")
    b = Backoff()
    start = [*(command or kidneyfl_command()), "site", "start", str(site.source)]
    start += ["--stop-timeout", f"{stop_timeout:g}"]
    if backoff == "kidneyfl":
        start += ["--restart", "on-failure"]
    if backoff == "systemd":
        steps = [
            "# Exit 3: the SuperNode or the executor died: restart; 2: the YAML or",
            "# the host is wrong: no restart (fix it, then systemctl restart).",
            "Restart=on-failure",
            "RestartPreventExitStatus=2",
            f"RestartSec={b.first:g}s",
            "# 5 s, 10 s, 20 s ... 5 min (systemd >= 254; the delay does not",
            "# start over after a long run: `systemctl restart` resets it)",
            "RestartSteps=6",
            f"RestartMaxDelaySec={b.most:g}s",
        ]
    else:
        steps = [
            "# kidneyfl restarts the SuperNode and executor itself (5 s doubling",
            "# to 5 min, reset after an hour's run); systemd restarts kidneyfl.",
            "Restart=on-failure",
            "RestartPreventExitStatus=2",
            "RestartSec=30s",
        ]
    root = "# WARNING: runs as root; pass --user NAME (the site's account)\n"
    lines = [
        f"# kidneyfl site {site.name}: `kidneyfl site service {site.source}`",
        f"# Install: copy to /etc/systemd/system/kidneyfl-site-{site.name}.service,",
        "# then: systemctl daemon-reload && systemctl enable --now "
        f"kidneyfl-site-{site.name}",
        f"# Logs: journalctl -u kidneyfl-site-{site.name}, and {site.state_dir}/logs",
        "[Unit]",
        f"Description=kidneyfl site {site.name} (Flower SuperNode, supervised)",
        "Wants=network-online.target",
        "After=network-online.target",
        "# Never give up restarting (the delays above bound the rate).",
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=exec",
        f"{root if user == 'root' else ''}User={user}",
        f"WorkingDirectory={_unit_text(str(Path(site.source).parent))}",
        "Environment=PYTHONUNBUFFERED=1",
        f"ExecStart={_unit_text(shlex.join(start)).replace('$', '$$')}",
        *steps,
        "# SIGTERM to kidneyfl, which stops its processes; SIGKILL to any left.",
        "KillMode=mixed",
        f"TimeoutStopSec={stop_timeout + 15:g}s",
        "UMask=0077",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=full",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def _unit_text(text: str) -> str:
    """``%`` is systemd's specifier character: a literal one is doubled."""
    return text.replace("%", "%%")


def exec_supernode(
    site: SiteConfig, restart: Backoff | None = None, stop_timeout: float = 20.0
) -> int:
    """Run the site's SuperNode (approval off), supervised, until stopped.

    Its output is copied to the terminal and the site's log
    (:func:`client.node.start_logged`); :class:`Supervisor` stops it and
    anything it started together, says in one line if it ends on its own, and
    restarts it with
    ``restart``. Returns the exit code: 0 stopped by a signal, 3 the SuperNode
    ended (without ``restart``).

    Raises
    ------
    ConfigError
        If the YAML is incomplete, or the ClientAppIo port is taken.
    """
    from client.node import clientappio_port_problem, supernode_command, supernode_env

    cmd = supernode_command(site)
    env = supernode_env(site)
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    return Supervisor(
        site,
        [("SuperNode", cmd)],
        env,
        stop_timeout=stop_timeout,
        ready=lambda: clientappio_port_problem(site),
    ).run(restart)
