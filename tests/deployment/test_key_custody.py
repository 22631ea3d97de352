"""The consortium CA's private key never sits with the coordinator's files.

``docker/make-certs.sh`` writes the CA key to its own folder; the folder the
coordinator gets holds the CA certificate, the server certificate and the
server key only; the compose file mounts exactly those three; an older layout
with the CA key among the coordinator's files is refused with the fix.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from sim.runner import PROJECT_DIR

SCRIPT = PROJECT_DIR / "docker" / "make-certs.sh"
COORDINATOR_FILES = {"ca.crt", "server.pem", "server.key"}


def _certs(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _is_private_key(path: Path) -> bool:
    return b"PRIVATE KEY" in path.read_bytes()


def test_ca_key_is_written_only_to_the_ca_folder(tmp_path):
    certs, ca = tmp_path / "certs", tmp_path / "offline-ca"
    res = _certs(certs, "IP:127.0.0.1,DNS:localhost", ca)
    assert res.returncode == 0, res.stderr
    assert {p.name for p in certs.iterdir()} == COORDINATOR_FILES
    keys = [p.name for p in certs.iterdir() if _is_private_key(p)]
    assert keys == ["server.key"]  # the coordinator's own key, nothing else
    assert _is_private_key(ca / "ca.key")
    assert (ca / "ca.key").stat().st_mode & 0o077 == 0  # owner-only
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(certs / "ca.crt"),
            str(certs / "server.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Renewal reuses the CA: the hospitals' ca.crt stays valid.
    before = (certs / "ca.crt").read_bytes()
    (certs / "server.pem").rename(tmp_path / "old.pem")
    res = _certs(certs, "IP:127.0.0.1", ca)
    assert res.returncode == 0, res.stderr
    assert (certs / "ca.crt").read_bytes() == before
    assert "made consortium CA" not in res.stdout


def test_default_ca_folder_is_beside_not_inside(tmp_path):
    res = _certs(tmp_path / "certs")
    assert res.returncode == 0, res.stderr
    assert {p.name for p in (tmp_path / "certs").iterdir()} == COORDINATOR_FILES
    assert (tmp_path / "certs-ca" / "ca.key").is_file()


def test_ca_key_in_the_coordinators_folder_is_refused_with_the_fix(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    res = _certs(certs, "IP:127.0.0.1", tmp_path / "ca")
    assert res.returncode == 2
    assert "mv " in res.stderr and "ca.key" in res.stderr
    assert not (certs / "server.pem").exists()
    same = _certs(tmp_path / "x", "IP:127.0.0.1", tmp_path / "x")
    assert same.returncode == 2 and "same folder" in same.stderr


def test_compose_gives_the_coordinator_no_ca_key_and_no_control_port():
    compose = yaml.safe_load((PROJECT_DIR / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    coord = services["coordinator"]
    mounted = [v.split(":")[0] for v in coord["volumes"] if v.startswith("./")]
    assert sorted(Path(m).name for m in mounted) == sorted(COORDINATOR_FILES)
    for svc in services.values():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            assert "ca.key" not in vol and not source.rstrip("/").endswith("certs")
    # Only the hospitals' door is published; the operators reach the control
    # port through the coordinator's own network namespace.
    assert coord["ports"] == ["9092:9092"]
    assert services["admin"]["network_mode"] == "service:coordinator"
    # ... and the coordinator image binds that control port to loopback.
    from cli.main import build_parser

    (line,) = [
        x
        for x in (PROJECT_DIR / "docker" / "Dockerfile").read_text().splitlines()
        if x.startswith("ENTRYPOINT") and '"coordinator"' in x
    ]
    args = build_parser().parse_args(yaml.safe_load(line[len("ENTRYPOINT") :])[1:])
    assert args.operator_host == "127.0.0.1" and args.host == "0.0.0.0"
