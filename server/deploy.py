"""The coordinator's deployment commands: the SuperLink and the CLI connection.

``superlink_command`` is the exact command the runbook and the coordinator's
Docker image use: Flower's SuperLink behind two listeners
(``server/fleet_gate.py``): the hospitals' port serves the Fleet API only, the
operators' address (127.0.0.1:9093 by default) the Control and Runtime APIs,
with ``flower-superlink``'s own settings:

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

import sys
import tomllib
from pathlib import Path

import tomli_w

from common.atomic import atomic_write_text

STATE_DB = "superlink.db"  # the SuperLink's database, in the --state folder


def superlink_command(
    certs: Path,
    state: Path,
    host: str = "0.0.0.0",
    port: int = 9092,
    auth: bool = True,
    operator_host: str = "127.0.0.1",
    operator_port: int = 9093,
) -> list[str]:
    """The SuperLink with TLS, node authentication, a database and two doors.

    ``host``/``port`` is where the hospitals' SuperNodes connect (Fleet API
    only); ``operator_host``/``operator_port`` where the consortium's ``flwr``
    CLI and the ServerApp connect (Control and Runtime APIs): keep it on
    loopback or the consortium's own network.

    Raises
    ------
    FileNotFoundError
        If a certificate file is missing (make them with docker/make-certs.sh).
    ValueError
        If both listeners are given the same port.
    """
    certs = Path(certs)
    files = {n: certs / n for n in ("ca.crt", "server.pem", "server.key")}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found; run `docker/make-certs.sh {certs} SAN` first"
            )
    if int(port) == int(operator_port):
        raise ValueError(
            f"--port and --operator-port are both {port}: the hospitals' Fleet "
            "port and the operators' control port must differ"
        )
    flower = [
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
        operator_host,
        "--port",
        str(operator_port),
    ]
    if auth:
        flower.insert(0, "--enable-supernode-auth")
    return [
        sys.executable,
        "-m",
        "server.fleet_gate",
        "--fleet-host",
        host,
        "--fleet-port",
        str(port),
        "--",
        *flower,
    ]


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
