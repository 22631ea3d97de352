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
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.config import ConfigError, SiteConfig
from common.runtime import flower_process_env


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
    return flower_process_env(env)


def exec_supernode(site: SiteConfig) -> None:
    """Replace this process with the site's SuperNode (signals reach it directly)."""
    cmd = supernode_command(site)
    env = supernode_env(site)
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    os.execvpe(cmd[0], cmd, env)
