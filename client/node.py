"""The hospital's SuperNode: its key pair and the exact command that starts it.

Everything a site needs to join is in its site YAML (``federation:`` block), so
``kidneyfl site start sites/<site>.yaml`` is the one command hospital IT runs;
``--print`` shows the ``flower-supernode`` command it would run, which the
README's runbook also gives in full. Flags are chosen for a hospital:

- TLS to the coordinator, verified against the consortium's CA, unless the YAML
  says ``insecure: true`` (local tests only);
- SuperNode authentication with the site's own private key (the public half is
  the only thing the consortium ever receives);
- no runtime dependency installation: the site runs only the packages its IT
  installed, never what a run asks to download;
- the SuperNode's local ClientApp API listens on 127.0.0.1 only;
- ``FLWR_HOME`` inside the site's state directory, so apps Flower installs stay
  with the site's other state.

What the SuperNode and its ClientApps print reaches the terminal unchanged and
``<state_dir>/logs/supernode.log``, with a kidneyfl line added when the node
connects and when each request arrives; kidneyfl's own loggers in every process
of the site also append to ``<state_dir>/logs/kidneyfl.log`` (``common/logs.py``),
including one line per request saying what the site did with it.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.config import ConfigError, SiteConfig
from common.logs import LOG_DIR_ENV
from common.runtime import flower_process_env

LOGS = "logs"  # under the site's state_dir
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RUN_ROUND = re.compile(r"\[RUN (\d+)(?:, ROUND ([^\]]+))?\]")
_RECEIVING = re.compile(r"Receiving: (\S+) message")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_FLOWER_EXIT = re.compile(r"Exit Code: (\d+)")
_SITE_CONFIG = re.compile(r'site-config="([^"]+)"')
_write_lock = threading.Lock()


def make_node_key(path: Path, comment: str = "") -> Path:
    """Write a new ECDSA P-384 key pair for SuperNode authentication.

    ``path`` receives the private key (OpenSSH format, mode 0600) and
    ``path.pub`` the public key to send to the consortium. Returns the public
    key's path.

    Raises
    ------
    FileExistsError
        If either file exists (a site's identity is never silently replaced).
    """
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    for p in (path, pub):
        if p.exists():
            raise FileExistsError(
                f"{p} exists; keep using it, or move it away to make a new identity "
                "(the consortium must then register the new public key)"
            )
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    pub.write_bytes(public + (f" {comment}".encode() if comment else b"") + b"\n")
    return pub


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def supernode_command(site: SiteConfig) -> list[str]:
    """The ``flower-supernode`` command line for a site YAML.

    Raises
    ------
    ConfigError
        If the YAML has no ``federation:`` block, or the key or CA is missing or
        readable by others.
    """
    fed = site.federation
    if fed is None:
        raise ConfigError(
            f"{site.source}: no federation block; add federation.superlink "
            "(HOST:PORT of the coordinator), federation.root_certificates (the "
            "consortium's ca.crt) and federation.auth_key (from kidneyfl site keygen)"
        )
    cmd = [_bin("flower-supernode"), "--superlink", fed.superlink]
    if fed.insecure:
        cmd.append("--insecure")
    else:
        assert fed.root_certificates is not None  # the schema requires it
        if not fed.root_certificates.is_file():
            raise ConfigError(
                f"{site.source}: federation.root_certificates {fed.root_certificates} "
                "not found; ask the consortium for its ca.crt"
            )
        cmd += ["--root-certificates", str(fed.root_certificates)]
    if fed.auth_key is not None:
        if not fed.auth_key.is_file():
            raise ConfigError(
                f"{site.source}: federation.auth_key {fed.auth_key} not found; make "
                f"it with `kidneyfl site keygen {fed.auth_key}`"
            )
        if fed.auth_key.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{site.source}: federation.auth_key {fed.auth_key} is readable by "
                f"other users; run `chmod 600 {fed.auth_key}`"
            )
        cmd += ["--auth-supernode-private-key", str(fed.auth_key)]
    cmd += [
        "--node-config",
        f'site-config="{site.source}"',
        "--host",
        "127.0.0.1",
        "--port",
        str(fed.clientappio_port),
    ]
    return cmd


def supernode_env(site: SiteConfig) -> dict[str, str]:
    """Environment for the SuperNode: Flower's state beside the site's own."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(site.state_dir / "flwr")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("FLWR_ALLOW_RUNTIME_DEPENDENCY_INSTALLATION", None)
    env.setdefault(LOG_DIR_ENV, str(site.state_dir / LOGS))  # the site's log file
    return flower_process_env(env)


class SiteLines:
    """kidneyfl's lines about what a SuperNode's output shows: connected,
    request arrived. Fed one line at a time; returns the line to add or None.

    The round is Flower's ``[RUN 77, ROUND 3]`` line before ``Receiving:``,
    which Flower prints only when the coordinator gave the message a group id;
    without it (``[RUN 77]``) the line has no round. Also remembers Flower's
    last ``Exit Code: N`` and the reason under it (:attr:`flower_exit`)."""

    def __init__(self, site: str, superlink: str) -> None:
        self.site, self.superlink = site, superlink
        self._round: str | None = None
        self._exit: str | None = None
        self._reason: str | None = None

    @property
    def flower_exit(self) -> str:
        """``Flower exit code 305: <reason>``, or "" if Flower printed none."""
        if self._exit is None:
            return ""
        return f"Flower exit code {self._exit}" + (
            f": {self._reason}" if self._reason else ""
        )

    def feed(self, line: str) -> str | None:
        """The kidneyfl line that ``line`` calls for, if any."""
        text = _ANSI.sub("", line)
        if m := _FLOWER_EXIT.search(text):
            self._exit, self._reason = m.group(1), None
            return None
        if self._exit is not None and self._reason is None and text.strip():
            self._reason = text.strip()[:200]
        if m := _NODE_ID.search(text):
            return f"{self.site}: connected to {self.superlink} as node {m.group(1)}"
        if m := _RUN_ROUND.search(text):
            self._round = m.group(2)
            return None
        if m := _RECEIVING.search(text):
            where = f" (round {self._round})" if self._round else ""
            self._round = None
            return f"{self.site}: {m.group(1)} request arrived{where}"
        return None


class LoggedProcess(subprocess.Popen):
    """A process started by :func:`start_logged`: its name, start time, the
    thread copying its output and what that output showed."""

    name: str
    started: float  # time.monotonic()
    copier: threading.Thread
    lines: SiteLines


def start_logged(
    cmd: list[str],
    env: dict[str, str],
    site: SiteConfig,
    out: IO[bytes] | None = None,
    name: str = "process",
) -> LoggedProcess:
    """Start ``cmd``; its output goes, unchanged, to ``out`` (default: this
    process's stderr) and to ``<state_dir>/logs/supernode.log``, with
    :class:`SiteLines` added to both. Returns the process; a daemon thread
    copies its output until it exits.

    The process leads its own process group (a terminal's Ctrl-C reaches only
    this process, which stops the site in order: :mod:`client.supervise`),
    reads nothing from the terminal, and gets SIGTERM when this process dies
    (Linux), so it is never left running without its supervisor."""
    log_dir = site.state_dir / LOGS
    log_dir.mkdir(parents=True, exist_ok=True)
    sink = out if out is not None else sys.stderr.buffer
    superlink = site.federation.superlink if site.federation else "the SuperLink"
    lines = SiteLines(site.name, superlink)
    # Unbuffered: a pipe would otherwise hold Python's output back for minutes.
    env = {**env, "PYTHONUNBUFFERED": "1"}
    run = [*_parent_death_shim(), *cmd]
    proc = LoggedProcess(  # noqa: S603 - our own command line
        run,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
        process_group=0,
    )
    proc.name, proc.started, proc.lines = name, time.monotonic(), lines
    log = (log_dir / "supernode.log").open("ab")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    log.write(
        f"--- {stamp} started {name} (pid {proc.pid}): {' '.join(cmd)}\n".encode()
    )

    def copy() -> None:
        assert proc.stdout is not None  # PIPE above
        for raw in iter(proc.stdout.readline, b""):
            note = lines.feed(raw.decode("utf-8", "replace"))
            extra = f"{time.strftime('%H:%M:%S')} {note}\n".encode() if note else b""
            plain = _ANSI.sub("", raw.decode("utf-8", "replace")).encode()
            with _write_lock:
                for fh, data in ((sink, raw + extra), (log, plain + extra)):
                    try:
                        fh.write(data)
                        fh.flush()
                    except (OSError, ValueError):
                        continue  # a closed terminal must not block the node
        log.close()

    proc.copier = threading.Thread(target=copy, daemon=True)
    proc.copier.start()
    return proc


# Run before the real command (which it execs): SIGTERM to it when its parent
# dies, even by SIGKILL (PR_SET_PDEATHSIG survives exec); if the parent is
# already gone, exit at once.
_SHIM = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None).prctl(1, 15, 0, 0, 0)\n"
    "os.getppid() == int(sys.argv[1]) or sys.exit(143)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


def _parent_death_shim() -> list[str]:
    if not sys.platform.startswith("linux"):
        return []
    return [sys.executable, "-c", _SHIM, str(os.getpid())]


def site_note(site: SiteConfig, line: str) -> None:
    """Append one timestamped kidneyfl line to ``<state_dir>/logs/supernode.log``."""
    path = site.state_dir / LOGS / "supernode.log"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with _write_lock:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(f"{stamp} {line}\n")
        except OSError:
            pass  # the terminal and kidneyfl.log have it


# -- The SuperNode's local port: one per site on a host ------------------------
def port_error(port: int) -> int:
    """0 if a server could listen on 127.0.0.1:``port`` now, else the errno.

    Binds as uvicorn does (``SO_REUSEADDR``): connections of a stopped server
    waiting in TIME_WAIT do not count, a listening socket does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc.errno or errno.EADDRINUSE
    return 0


def free_port_near(port: int) -> int:
    """The first port above ``port`` that is free on 127.0.0.1 now."""
    for candidate in range(port + 1, min(port + 200, 65536)):
        if candidate >= 1024 and not port_error(candidate):
            return candidate
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_listener(port: int) -> tuple[int, str] | None:
    """(pid, command line) of the process listening on TCP ``port``, where
    /proc shows it (Linux; processes of other users may be hidden)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    for fd_dir in Path("/proc").glob("[0-9]*/fd") if inodes else ():
        try:
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                raw = (fd_dir.parent / "cmdline").read_bytes()
                return int(fd_dir.parent.name), raw.replace(b"\0", b" ").decode(
                    "utf-8", "replace"
                ).strip()
        except OSError:
            continue
    return None


def clientappio_port_problem(site: SiteConfig, running_ok: bool = False) -> str | None:
    """Why the site's SuperNode could not listen on its ClientAppIo port, or None.

    Two sites on one host need two ``federation.clientappio_port`` values (the
    default is 9094 for every site). With ``running_ok``, the port held by this
    site's own running SuperNode is no problem (``site check`` beside a running
    site)."""
    fed = site.federation
    if fed is None:
        return None
    port = fed.clientappio_port
    err = port_error(port)
    if not err:
        return None
    key = f"federation.clientappio_port {port} in {site.source}"
    if err != errno.EADDRINUSE:
        return (
            f"{key}: 127.0.0.1:{port} cannot be used ({os.strerror(err)}); set "
            f"federation.clientappio_port: {free_port_near(max(port, 9094))}"
        )
    owner = port_listener(port)
    if owner is not None and f'site-config="{site.source}"' in owner[1]:
        if running_ok:
            return None
        return (
            f"{key}: this site's SuperNode is already running (pid {owner[0]}); "
            "stop it first (kidneyfl site start runs one per site)"
        )
    who = ""
    if owner is not None and (other := _SITE_CONFIG.search(owner[1])):
        who = f" by the SuperNode of {other.group(1)} (pid {owner[0]})"
    elif owner is not None:
        who = f" by pid {owner[0]} ({owner[1][:100]})"
    return (
        f"{key} is already in use on 127.0.0.1{who}; every site on a host needs "
        f"its own port: set federation.clientappio_port: {free_port_near(port)} "
        "(free now)"
    )


def check_clientappio_port(site: SiteConfig, report: Any) -> None:
    """``kidneyfl site check``: a finding ``setup-port`` if the port is taken."""
    from client.data.case_check import FATAL, Finding

    if site.federation is None:
        return
    problem = clientappio_port_problem(site, running_ok=True)
    port = site.federation.clientappio_port
    if problem is None:
        report.environment["clientappio_port"] = f"{port} (127.0.0.1) usable"
        return
    report.findings.append(
        Finding(
            "setup-port",
            FATAL,
            str(site.source),
            problem,
            "give each site on this host its own federation.clientappio_port",
        )
    )
