"""A hospital's node identity and the commands that start each side."""

from __future__ import annotations

import os
import stat
import tomllib

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)

from client.node import make_node_key, supernode_command, supernode_env
from common.config import ConfigError, load_site_config
from server.deploy import superlink_command, write_connection
from tests.fakes import write_site_yaml


def test_node_key_pair_is_p384_private_0600_and_never_overwritten(tmp_path):
    key = tmp_path / "keys" / "hospital-a"
    pub = make_node_key(key, comment="hospital-a")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    private = load_ssh_private_key(key.read_bytes(), None)
    public = load_ssh_public_key(pub.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers()
    assert pub.read_text().strip().endswith("hospital-a")
    with pytest.raises(FileExistsError, match="new identity"):
        make_node_key(key)


def _site(tmp_path, federation):
    yml = write_site_yaml(tmp_path, "hospital-a", generate=False)
    doc = yaml.safe_load(yml.read_text())
    doc["federation"] = federation
    yml.write_text(yaml.safe_dump(doc))
    return yml


def test_supernode_command_tls_auth_local_api(tmp_path):
    (tmp_path / "ca.crt").write_text("ca")
    make_node_key(tmp_path / "node")
    yml = _site(
        tmp_path,
        {
            "superlink": "fl.example:9092",
            "root_certificates": "ca.crt",
            "auth_key": "node",
            "clientappio_port": 9111,
        },
    )
    site = load_site_config(yml)
    cmd = supernode_command(site)
    assert cmd[0].endswith("flower-supernode")
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert args["--superlink"] == "fl.example:9092"
    assert args["--root-certificates"] == str(tmp_path / "ca.crt")  # resolved
    assert args["--auth-supernode-private-key"] == str(tmp_path / "node")
    assert args["--node-config"] == f'site-config="{yml.resolve()}"'
    assert args["--host"] == "127.0.0.1" and args["--port"] == "9111"
    assert "--insecure" not in cmd
    assert "--allow-runtime-dependency-installation" not in cmd
    env = supernode_env(site)
    assert env["FLWR_HOME"] == str(site.state_dir / "flwr")
    # Tasks are picked up every 0.2 s, unless the operator chose otherwise.
    assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.2"
    # Flower's telemetry (usage events to telemetry.flower.ai) is off.
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    saved = {k: os.environ.pop(k, None) for k in ("FLWR_TELEMETRY_ENABLED",)}
    os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = "2"
    os.environ["FLWR_TELEMETRY_ENABLED"] = "1"  # an operator's explicit choice
    try:
        env = supernode_env(site)
        assert env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2"
        assert env["FLWR_TELEMETRY_ENABLED"] == "1"
    finally:
        del os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]
        del os.environ["FLWR_TELEMETRY_ENABLED"]
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def test_supernode_command_refuses_unsafe_or_missing_files(tmp_path):
    (tmp_path / "ca.crt").write_text("ca")
    make_node_key(tmp_path / "node")
    fed = {
        "superlink": "fl.example:9092",
        "root_certificates": "ca.crt",
        "auth_key": "node",
    }
    os.chmod(tmp_path / "node", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        supernode_command(load_site_config(_site(tmp_path, fed)))
    with pytest.raises(ConfigError, match="kidneyfl site keygen"):
        supernode_command(load_site_config(_site(tmp_path, {**fed, "auth_key": "x"})))
    with pytest.raises(ConfigError, match="ca.crt"):
        supernode_command(
            load_site_config(_site(tmp_path, {**fed, "root_certificates": "no.crt"}))
        )


def test_federation_block_requires_tls_unless_explicitly_insecure(tmp_path):
    with pytest.raises(ConfigError, match="root_certificates"):
        load_site_config(_site(tmp_path, {"superlink": "fl.example:9092"}))
    with pytest.raises(ConfigError, match="superlink"):
        load_site_config(_site(tmp_path, {"superlink": "no-port", "insecure": True}))
    site = load_site_config(
        _site(tmp_path, {"superlink": "127.0.0.1:9092", "insecure": True})
    )
    assert "--insecure" in supernode_command(site)
    no_fed = write_site_yaml(tmp_path, "plain", generate=False)
    with pytest.raises(ConfigError, match="no federation block"):
        supernode_command(load_site_config(no_fed))


def test_superlink_command_and_connection(tmp_path):
    with pytest.raises(FileNotFoundError, match="make-certs.sh"):
        superlink_command(tmp_path, tmp_path / "state")
    for name in ("ca.crt", "server.pem", "server.key"):
        (tmp_path / name).write_text("x")
    cmd = superlink_command(tmp_path, tmp_path / "state", "127.0.0.1", 9999)
    # Hospitals' door: the Fleet API only; Flower's own --host/--port is the
    # operators' door, on loopback by default.
    assert cmd[cmd.index("--fleet-port") + 1] == "9999"
    assert cmd[cmd.index("--port") + 1] == "9093"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    with pytest.raises(ValueError, match="must differ"):
        superlink_command(tmp_path, tmp_path / "state", port=9093, operator_port=9093)
    assert "--enable-supernode-auth" in cmd
    assert "--disable-runtime-dependency-installation" in cmd
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "state" / "superlink.db")
    home = tmp_path / "home"
    (home).mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n[superlink.local]\naddress = ":local:"\n'
    )
    write_connection(home, "consortium", "fl.example:9092", tmp_path / "ca.crt")
    conf = tomllib.loads((home / "config.toml").read_text())["superlink"]
    assert conf["local"] == {"address": ":local:"}  # others kept
    assert conf["default"] == "consortium"
    assert conf["consortium"]["root-certificates"] == str(tmp_path / "ca.crt")
    with pytest.raises(ValueError, match="root-certificates"):
        write_connection(home, "x", "a:1")


# -- what hospital IT sees (issue 20) --------------------------------------------
# Lines flower-supernode prints (1.41 and 1.42 alike) when it connects and when
# a request comes.
SUPERNODE_OUTPUT = [
    "\x1b[92mINFO \x1b[0m:      Starting Flower SuperNode",
    "\x1b[92mINFO \x1b[0m:      SuperNode ID: 4711",
    "\x1b[92mINFO \x1b[0m:      ",
    "\x1b[92mINFO \x1b[0m:      [RUN 77, ROUND 3]",
    "\x1b[92mINFO \x1b[0m:      Receiving: train message (ID: abc)",
    "WARNING kidneyfl.site: hospital-a: train request (round 3): refused; budget",
    "\x1b[92mINFO \x1b[0m:      [RUN 77]",
    "\x1b[92mINFO \x1b[0m:      Receiving: query message (ID: def)",
]


def test_site_start_adds_connected_and_request_lines_and_keeps_a_log(tmp_path):
    import io
    import sys
    import time

    from client.node import start_logged

    site = load_site_config(write_site_yaml(tmp_path, "hospital-a", generate=False))
    script = "\n".join(f"print({line!r})" for line in SUPERNODE_OUTPUT)
    term = io.BytesIO()
    term.close = lambda: None  # type: ignore[method-assign]
    proc = start_logged([sys.executable, "-c", script], dict(os.environ), site, term)
    assert proc.wait(30) == 0
    log = site.state_dir / "logs" / "supernode.log"
    for _ in range(50):  # the copier finishes just after the process
        if "query request" in log.read_text():
            break
        time.sleep(0.1)
    shown = term.getvalue().decode()
    for line in SUPERNODE_OUTPUT:  # Flower's own lines pass unchanged
        assert line in shown
    added = [x.split(" ", 1)[1] for x in shown.splitlines() if "hospital-a: " in x]
    assert added == [
        "hospital-a: connected to the SuperLink as node 4711",
        "hospital-a: train request arrived (round 3)",
        "kidneyfl.site: hospital-a: train request (round 3): refused; budget",
        "hospital-a: query request arrived",
    ]
    logged = log.read_text()
    assert "connected to the SuperLink as node 4711" in logged
    assert "INFO :      SuperNode ID: 4711" in logged and "\x1b" not in logged


def test_site_processes_log_to_the_site_state_dir(tmp_path):
    import logging

    from common.logs import LOG_DIR_ENV, add_log_file, log_request, remove_log_file

    site = load_site_config(write_site_yaml(tmp_path, "hospital-a", generate=False))
    env = supernode_env(site)
    assert env[LOG_DIR_ENV] == str(site.state_dir / "logs")
    handler = add_log_file(site.state_dir / "logs" / "kidneyfl.log")
    try:
        logging.getLogger("kidneyfl").setLevel(logging.INFO)
        log_request("hospital-a", "train", 2, "trained", "4 steps, epsilon 3.10")
        log_request("hospital-a", "train", 3, "refused", "budget 10 would be passed")
        log_request("hospital-a", "evaluate", 3, "evaluated", "5 validation cases")
    finally:
        remove_log_file(handler)
    text = (site.state_dir / "logs" / "kidneyfl.log").read_text().splitlines()
    assert [line.split(" kidneyfl.site: ")[1] for line in text] == [
        "hospital-a: train request (round 2): trained; 4 steps, epsilon 3.10",
        "hospital-a: train request (round 3): refused; budget 10 would be passed",
        "hospital-a: evaluate request (round 3): evaluated; 5 validation cases",
    ]
    assert "WARNING" in text[1] and "INFO" in text[0]
