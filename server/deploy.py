"""The coordinator's deployment commands: the SuperLink and the CLI connection.

``superlink_command`` is the exact ``flower-superlink`` command the runbook and
the coordinator's Docker image use:

- TLS with the consortium's certificate (``docker/make-certs.sh``);
- SuperNode authentication on: only hospitals whose public key the consortium
  registered (``flwr supernode register``) can join;
- a database, so node registrations and run history survive a restart;
- no runtime dependency installation (the coordinator never downloads what a
  run's bundle asks for).

``write_connection`` adds a named SuperLink connection to Flower's
``$FLWR_HOME/config.toml`` for ``flwr run`` and ``flwr supernode ...``.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

import tomli_w

from common.atomic import atomic_write_text

STATE_DB = "superlink.db"  # the SuperLink's database, in the --state folder


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def superlink_command(
    certs: Path,
    state: Path,
    host: str = "0.0.0.0",
    port: int = 9092,
    auth: bool = True,
) -> list[str]:
    """``flower-superlink`` with TLS, node authentication and a database.

    Raises
    ------
    FileNotFoundError
        If a certificate file is missing (make them with docker/make-certs.sh).
    """
    certs = Path(certs)
    files = {n: certs / n for n in ("ca.crt", "server.pem", "server.key")}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; run `docker/make-certs.sh {certs} SAN` first"
            )
    cmd = [
        _bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(files["ca.crt"]),
        "--ssl-certfile",
        str(files["server.pem"]),
        "--ssl-keyfile",
        str(files["server.key"]),
        "--database",
        str(Path(state) / STATE_DB),
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]
    if auth:
        cmd.insert(1, "--enable-supernode-auth")
    return cmd


def write_connection(
    flwr_home: Path,
    name: str,
    address: str,
    root_certificates: Path | None = None,
    insecure: bool = False,
    default: bool = True,
) -> Path:
    """Add or replace connection ``name`` in ``$FLWR_HOME/config.toml``.

    Other connections in the file are kept. Returns the file's path.
    """
    if not insecure and root_certificates is None:
        raise ValueError(
            "a TLS connection needs --root-certificates (the consortium's ca.crt); "
            "use --insecure only for a local test"
        )
    path = Path(flwr_home) / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    links = config.setdefault("superlink", {})
    entry: dict[str, object] = {"address": address}
    if insecure:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    links[name] = entry
    if default or "default" not in links:
        links["default"] = name
    atomic_write_text(path, tomli_w.dumps(config))
    return path
