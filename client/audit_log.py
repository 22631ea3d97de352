"""The site's audit log: every request it received, and what it did about it.

An append-only JSON-lines file in the site's state directory. Each entry holds
the hash of the previous one and its own (a hash chain), and a small head file
holds the count and the last hash, so an edited, deleted, reordered or
truncated entry is found by :meth:`AuditLog.verify`, which names the first bad
one. Appends take an exclusive file lock (several ClientApp processes may
answer at once) and are fsync'ed before the reply leaves.

The chain is tamper-evident, not tamper-proof: someone who can write the state
directory can rebuild the whole chain. Copy the head hash
(``kidneyfl site audit SITE_YAML --verify``) to a system they cannot write, and a
rebuilt log no longer matches it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_json

AUDIT_NAME = "audit-log.jsonl"
HEAD_NAME = "audit-log.head.json"
LOCK_NAME = "audit-log.lock"
GENESIS = "0" * 64
FIELDS = (
    "time",
    "site",
    "run_id",
    "app_hash",
    "message_type",
    "round",
    "message_id",
    "decision",
    "reason",
    "epsilon_before",
    "epsilon_after",
    "bytes_sent",
    "where",
)


class AuditError(RuntimeError):
    """The audit log cannot be written; the site must not answer unrecorded."""


@dataclass(frozen=True)
class AuditCheck:
    """Result of :meth:`AuditLog.verify`; ``first_bad`` is a 1-based entry number."""

    ok: bool
    entries: int
    first_bad: int | None = None
    problem: str = ""
    head: str = GENESIS


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 over the entry's canonical JSON (``hash`` itself left out)."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


class AuditLog:
    """The audit log of one site.

    Parameters
    ----------
    state_dir : Path
        The site's state directory (from the site YAML).
    """

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / AUDIT_NAME
        self.head_path = self.dir / HEAD_NAME

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _head(self) -> dict[str, Any]:
        if not self.head_path.exists():
            return {"count": 0, "hash": GENESIS}
        return json.loads(self.head_path.read_text())

    def append(self, **fields: Any) -> dict[str, Any]:
        """Add one entry (keys from :data:`FIELDS`); returns it with its hashes.

        Raises
        ------
        AuditError
            If the log cannot be written or its head is unreadable. Its text
            names the log's path: it is for the site's own log, and the
            site's edge (``client.edge.Edge``) answers the request with a
            fixed refusal.
        """
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown audit fields {sorted(unknown)}")
        entry: dict[str, Any] = {k: fields.get(k) for k in FIELDS}
        entry["time"] = entry["time"] or dt.datetime.now(dt.UTC).isoformat(
            timespec="milliseconds"
        )
        try:
            with self._locked():
                head = self._head()
                entry["seq"] = int(head["count"]) + 1
                entry["prev"] = head["hash"]
                entry["hash"] = entry_hash(entry)
                line = json.dumps(entry, sort_keys=True, separators=(",", ":"))
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(line + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                self._write_head({"count": entry["seq"], "hash": entry["hash"]})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # TypeError: a head file that is valid JSON but not an object
            raise AuditError(f"audit log {self.path} not writable: {exc}") from exc
        return entry

    def _write_head(self, head: dict[str, Any]) -> None:
        atomic_write_json(self.head_path, head, indent=None, sort_keys=False)

    def entries(self) -> list[dict[str, Any]]:
        """All entries that parse (use :meth:`verify` to trust them)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def verify(self) -> AuditCheck:
        """Walk the chain; the first entry that breaks it, and why."""
        lines = (
            self.path.read_text(encoding="utf-8").split("\n")
            if self.path.exists()
            else []
        )
        if lines and lines[-1] == "":
            lines.pop()
        prev = GENESIS
        for i, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
            except ValueError:
                return AuditCheck(False, i - 1, i, "not a complete JSON entry", prev)
            problem = _link_problem(entry, i, prev)
            if problem:
                return AuditCheck(False, i - 1, i, problem, prev)
            prev = entry["hash"]
        return self._against_head(lines, prev)

    def _against_head(self, lines: list[str], prev: str) -> AuditCheck:
        """The walked chain compared with the head file's count and hash."""
        try:
            head = self._head()
        except ValueError:
            return AuditCheck(False, len(lines), None, f"{HEAD_NAME} unreadable", prev)
        count = int(head.get("count", 0))
        if count > len(lines):
            return AuditCheck(
                False,
                len(lines),
                len(lines) + 1,
                f"log truncated: head records {count} entries, log has {len(lines)}",
                prev,
            )
        # One entry past the head is a crash between the append and the head
        # update; more is an insertion.
        if len(lines) - count > 1:
            return AuditCheck(
                False, len(lines), count + 1, "entries past the recorded head", prev
            )
        if count and json.loads(lines[count - 1]).get("hash") != head.get("hash"):
            return AuditCheck(
                False, len(lines), count, "entry differs from the recorded head", prev
            )
        return AuditCheck(True, len(lines), head=prev)


def _link_problem(entry: dict[str, Any], seq: int, prev: str) -> str:
    """Why ``entry`` does not continue the chain at ``seq`` after ``prev`` ("")."""
    if entry.get("seq") != seq:
        return f"sequence {entry.get('seq')}, expected {seq}"
    if entry.get("prev") != prev:
        return "previous-hash link broken (entry removed)"
    if entry.get("hash") != entry_hash(entry):
        return "content edited (hash mismatch)"
    return ""


def _eps(v: Any) -> str:
    return "-" if v is None else f"{float(v):.3f}"


def format_table(entries: list[dict[str, Any]]) -> str:
    """The log as a fixed-width table, oldest first."""
    head = (
        f"{'#':>4}  {'time (UTC)':<19}  {'run':<20}  {'type':<9}{'round':>6}  "
        f"{'decision':<9}{'eps before':>11}{'eps after':>10}{'bytes':>11}  "
        f"{'app':<12}  reason"
    )
    rows = [head]
    for e in entries:
        when = str(e.get("time", ""))[:19].replace("T", " ")
        rows.append(
            f"{e.get('seq', ''):>4}  {when:<19}  {str(e.get('run_id', ''))[:20]:<20}  "
            f"{str(e.get('message_type', ''))[:9]:<9}{str(e.get('round', '-')):>6}  "
            f"{str(e.get('decision', '')):<9}{_eps(e.get('epsilon_before')):>11}"
            f"{_eps(e.get('epsilon_after')):>10}{e.get('bytes_sent') or 0:>11}  "
            f"{str(e.get('app_hash') or '-')[:12]:<12}  {e.get('reason') or ''}"
        )
    if not entries:
        rows.append("(no requests recorded yet)")
    return "\n".join(rows)
