"""The SuperLink's state database across Flower upgrades.

``flower-superlink --database`` keeps node registrations, run history and
bundles in one SQLite file whose schema Flower versions with alembic. A newer
Flower migrates an older file in place when it starts (1.42 adds revision
``d9bd9d502cf9`` over 1.41's ``d90a2f91f23c``), and there is no way back; a
file written by a newer Flower than the installed one cannot be read.

:func:`check_state_database` runs before ``kidneyfl coordinator superlink``
starts Flower: an older file is first copied next to itself (a timestamped
backup), a file from a newer or unknown Flower is refused.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

# Alembic heads of the Flower releases kidneyfl has run on, to name the writer.
FLOWER_HEADS = {"d90a2f91f23c": "Flower 1.41", "d9bd9d502cf9": "Flower 1.42"}
VERSION_TABLE = "alembic_version"


class StateDatabaseError(RuntimeError):
    """The state database cannot be used by the installed Flower."""


@dataclass(frozen=True)
class Schema:
    """The installed Flower's migrations: its head and every known revision."""

    version: str
    head: str
    known: frozenset[str]


def installed_schema() -> Schema:
    """Read the installed Flower's alembic scripts (its migration chain)."""
    import flwr
    from alembic.config import Config
    from alembic.script import ScriptDirectory
    from flwr.supercore.state.alembic.utils import ALEMBIC_DIR

    config = Config()
    config.set_main_option("path_separator", "os")
    config.set_main_option("script_location", str(ALEMBIC_DIR))
    config.set_main_option("version_locations", str(ALEMBIC_DIR / "versions"))
    scripts = ScriptDirectory.from_config(config)
    heads = scripts.get_heads()
    if len(heads) != 1:
        raise StateDatabaseError(f"Flower {flwr.__version__} has heads {heads}")
    known = frozenset(rev.revision for rev in scripts.walk_revisions())
    return Schema(str(flwr.__version__), heads[0], known)


def stored_revisions(db: Path) -> tuple[str, ...] | None:
    """The file's alembic revisions; () if it predates alembic; None if empty."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        tables = {
            row[0]
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if not row[0].startswith("sqlite_")
        }
        if VERSION_TABLE not in tables:
            return () if tables else None
        rows = conn.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall()
    return tuple(sorted(str(r[0]) for r in rows))


def writer(revisions: tuple[str, ...]) -> str:
    """Which Flower wrote a file at ``revisions``, in words."""
    if not revisions:
        return "a Flower from before alembic versioning"
    names = {FLOWER_HEADS.get(r) for r in revisions}
    if len(names) == 1 and None not in names:
        return names.pop()
    return f"an older Flower (schema {','.join(revisions)})"


def back_up(db: Path, now: datetime | None = None) -> Path:
    """Copy ``db`` to ``<db>.<UTC time>.bak`` beside it, WAL included.

    SQLite's backup API copies what a reader sees, so committed pages still in
    ``<db>-wal`` are in the copy too. An existing backup is never overwritten.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    target = db.with_name(f"{db.name}.{stamp}.bak")
    n = 1
    while target.exists():
        target = db.with_name(f"{db.name}.{stamp}-{n}.bak")
        n += 1
    with (
        contextlib.closing(sqlite3.connect(db)) as src,
        contextlib.closing(sqlite3.connect(target)) as dst,
    ):
        src.backup(dst)
    return target


def check_state_database(db: Path, schema: Schema | None = None) -> str | None:
    """Get ``db`` ready for the installed Flower; a line to show, or None.

    Returns None for a missing, empty or up-to-date file. For a file written by
    an older Flower, backs it up and returns one line saying who wrote it,
    where the backup is, and that Flower migrates it on start.

    Raises
    ------
    StateDatabaseError
        If the file was written by a newer or unknown Flower, or is not a
        SQLite database.
    """
    db = Path(db)
    if not db.is_file() or db.stat().st_size == 0:
        return None
    schema = schema or installed_schema()
    try:
        revisions = stored_revisions(db)
    except sqlite3.DatabaseError as exc:
        raise StateDatabaseError(
            f"{db}: not a SuperLink state database ({exc}); move it away or "
            "give --state a folder of its own"
        ) from exc
    if revisions is None or revisions == (schema.head,):
        return None
    unknown = [r for r in revisions if r not in schema.known]
    if unknown:
        raise StateDatabaseError(
            f"{db}: written by a newer or unknown Flower (schema "
            f"{','.join(unknown)}); Flower {schema.version} knows up to "
            f"{schema.head} and cannot read it. Start the SuperLink with the "
            "Flower that wrote it, or move the file away to start afresh"
        )
    backup = back_up(db)
    return (
        f"{db}: written by {writer(revisions)}; backed up to {backup}; "
        f"Flower {schema.version} migrates it to schema {schema.head} on start"
    )
