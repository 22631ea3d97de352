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

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

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
    request arrived. Fed one line at a time; returns the line to add or None."""

    def __init__(self, site: str, superlink: str) -> None:
        self.site, self.superlink = site, superlink
        self._round: str | None = None

    def feed(self, line: str) -> str | None:
        """The kidneyfl line that ``line`` calls for, if any."""
        text = _ANSI.sub("", line)
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


def start_logged(
    cmd: list[str],
    env: dict[str, str],
    site: SiteConfig,
    out: IO[bytes] | None = None,
) -> subprocess.Popen:
    """Start ``cmd``; its output goes, unchanged, to ``out`` (default: this
    process's stderr) and to ``<state_dir>/logs/supernode.log``, with
    :class:`SiteLines` added to both. Returns the process; a daemon thread
    copies its output until it exits."""
    log_dir = site.state_dir / LOGS
    log_dir.mkdir(parents=True, exist_ok=True)
    sink = out if out is not None else sys.stderr.buffer
    superlink = site.federation.superlink if site.federation else "the SuperLink"
    lines = SiteLines(site.name, superlink)
    # Unbuffered: a pipe would otherwise hold Python's output back for minutes.
    env = {**env, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(  # noqa: S603 - our own command line
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0
    )
    log = (log_dir / "supernode.log").open("ab")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    log.write(f"--- {stamp} started: {' '.join(cmd)}\n".encode())

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

    threading.Thread(target=copy, daemon=True).start()
    return proc


def exec_supernode(site: SiteConfig) -> None:
    """Run the site's SuperNode until it ends (SIGTERM/SIGINT are passed on).

    Its output is copied to the terminal and the site's log (:func:`start_logged`).

    Raises
    ------
    SystemExit
        With the SuperNode's exit code, when it is not 0.
    """
    cmd = supernode_command(site)
    env = supernode_env(site)
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    proc = start_logged(cmd, env, site)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    code = proc.wait()
    time.sleep(0.2)  # let the copier write the last lines
    if code:
        raise SystemExit(code)
