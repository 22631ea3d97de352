"""A SuperLink database written by Flower 1.41, met by the installed Flower.

The databases are built with Flower's own alembic migrations, stopped at the
revision before the installed head (1.41's), so they are what a 1.41 SuperLink
left behind.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main as kidneyfl
from server.deploy import STATE_DB
from server.superlink_db import (
    FLOWER_HEADS,
    StateDatabaseError,
    check_state_database,
    installed_schema,
    stored_revisions,
)
from sim.runner import PROJECT_DIR
from sim.superlink import free_port
from tests.deployment.harness import Proc, wait_for, wait_port

FLOWER_141_HEAD = "d90a2f91f23c"


def flower_database(path: Path, revision: str) -> Path:
    """A state database at ``revision``, by Flower's own migrations."""
    from alembic import command
    from flwr.supercore.state.alembic.utils import build_alembic_config
    from sqlalchemy import create_engine

    path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite:///{path}")
    try:
        command.upgrade(build_alembic_config(engine), revision)
    finally:
        engine.dispose()
    return path


def backups(db: Path) -> list[Path]:
    return sorted(db.parent.glob(f"{db.name}.*.bak"))


def test_installed_flower_is_one_migration_past_141():
    schema = installed_schema()
    assert schema.version == "1.42.0"
    assert FLOWER_HEADS[schema.head] == "Flower 1.42"
    assert FLOWER_141_HEAD in schema.known and FLOWER_141_HEAD != schema.head


def test_141_database_is_backed_up_and_named_in_one_line(tmp_path):
    db = flower_database(tmp_path / STATE_DB, FLOWER_141_HEAD)
    note = check_state_database(db)
    (backup,) = backups(db)
    assert note is not None and "\n" not in note
    assert "written by Flower 1.41" in note
    assert f"backed up to {backup}" in note
    assert "Flower 1.42.0 migrates it" in note and installed_schema().head in note
    # The copy is the 1.41 database, tables and all; the original is untouched
    # (Flower migrates it, not kidneyfl).
    assert stored_revisions(backup) == (FLOWER_141_HEAD,)
    assert stored_revisions(db) == (FLOWER_141_HEAD,)
    with sqlite3.connect(backup) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 10


def test_current_missing_or_empty_database_needs_nothing(tmp_path):
    assert check_state_database(tmp_path / STATE_DB) is None
    (tmp_path / "empty.db").touch()
    assert check_state_database(tmp_path / "empty.db") is None
    db = flower_database(tmp_path / "now" / STATE_DB, installed_schema().head)
    assert check_state_database(db) is None
    assert backups(db) == []


def test_database_from_a_newer_flower_is_refused_and_left_alone(tmp_path):
    db = flower_database(tmp_path / STATE_DB, installed_schema().head)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f00dfeed1234'")
    with pytest.raises(StateDatabaseError, match="newer or unknown Flower") as exc:
        check_state_database(db)
    assert "f00dfeed1234" in str(exc.value) and "1.42.0" in str(exc.value)
    assert backups(db) == []
    assert stored_revisions(db) == ("f00dfeed1234",)


def test_coordinator_superlink_refuses_a_newer_database_before_flower(tmp_path, capsys):
    certs = tmp_path / "certs"
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("x")
    state = tmp_path / "state"
    db = flower_database(state / STATE_DB, installed_schema().head)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f00dfeed1234'")
    args = ["coordinator", "superlink", "--certs", str(certs), "--state", str(state)]
    assert kidneyfl(args) == 2  # returned: Flower was never exec'd
    err = capsys.readouterr().err
    assert "error:" in err and "newer or unknown Flower" in err and str(db) in err


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    db = tmp_path / STATE_DB
    db.write_bytes(b"not sqlite at all, " * 10)
    with pytest.raises(StateDatabaseError, match="not a SuperLink state database"):
        check_state_database(db)


def _make_certs(certs: Path) -> None:
    res = subprocess.run(
        ["bash", str(PROJECT_DIR / "docker" / "make-certs.sh"), str(certs)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_superlink_starts_on_a_141_database_and_migrates_it(tmp_path):
    certs, state = tmp_path / "certs", tmp_path / "state"
    _make_certs(certs)
    db = flower_database(state / STATE_DB, FLOWER_141_HEAD)
    port = free_port()
    log = tmp_path / "superlink.log"
    cmd = [sys.executable, "-m", "cli.main", "coordinator", "superlink"]
    cmd += ["--certs", str(certs), "--state", str(state)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--operator-port", str(free_port())]
    with open(log, "ab") as fh:
        popen = subprocess.Popen(  # exec's flower-superlink: same PID
            cmd,
            cwd=PROJECT_DIR,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # No virtual environment on PATH: the command must find Flower's
            # own processes (flower-superexec) by itself, as from a service.
            env={"PATH": "/usr/bin:/bin", "FLWR_TELEMETRY_ENABLED": "0"},
        )
    proc = Proc("superlink", popen, log)
    try:
        wait_port(port, proc)
        head = installed_schema().head
        wait_for(lambda: stored_revisions(db) == (head,), 30, "the migration")
        (backup,) = backups(db)
        assert stored_revisions(backup) == (FLOWER_141_HEAD,)
        first = proc.text().splitlines()[0]
        assert first.startswith(f"{db}: written by Flower 1.41; backed up to {backup}")
    finally:
        proc.stop()
    assert popen.returncode is not None
