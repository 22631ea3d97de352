"""``runs/<run>/status.json``: where a run is, rewritten atomically as it goes.

The coordinator writes it when the run starts, when it sends a round's
requests, when each site answers and when a round ends; the terminal of
``kidneyfl simulate``, ``kidneyfl status`` and the live ``report.html`` all
read it. :class:`ProgressGrid` is the hook: it wraps the grid the strategy
sends through, so Flower's round loop stays untouched.

Node names (a site's registered or declared name) and messages may carry a
site's text, so every value is written through
:func:`server.reporting.text.safe_record` and read back through it again.
When the report could not be drawn in time (``live_report.draw_bounded``),
``report`` says so and how to redraw it (:func:`note_report`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_json
from server.reporting.text import NAME_LIMIT, safe_record, safe_text

STATUS_FILE = "status.json"
LIVE_STATES = ("starting", "waiting-for-sites", "running")
_PHASES = {"train": "training", "evaluate": "evaluating", "query": "fingerprint"}
REPORT_NOTE = "report"  # status.json key: why the report was not drawn
# The one lock on status.json writes in this process: the round loop's
# RunStatus and the report drawer's note never overwrite each other.
_WRITE_LOCK = threading.Lock()
_report_notes: dict[Path, str | None] = {}  # run folder -> report note
# A message says why a run stopped and how to resume it, with paths: longer
# than a site's sentence, still bounded.
MESSAGE_LIMIT = 2000


def _safe_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Status fields safe to show: top-level texts to :data:`MESSAGE_LIMIT`,
    nested values (node names) as any record."""
    return {
        safe_text(k, NAME_LIMIT): safe_text(v, MESSAGE_LIMIT)
        if isinstance(v, str)
        else safe_record(v)
        for k, v in fields.items()
    }


class RunStatus:
    """The run's status record; every change is written at once (atomically)."""

    def __init__(self, run_dir: Path, rounds_total: int, rounds_done: int = 0) -> None:
        self.path = Path(run_dir) / STATUS_FILE
        self.data: dict[str, Any] = {
            "state": "starting",
            "rounds_done": rounds_done,
            "rounds_total": rounds_total,
            "phase": "",
            "sites_asked": 0,
            "sites_answered": 0,
            "round_started": None,
            "started": time.time(),
            "message": "",
        }

    def update(self, **fields: Any) -> None:
        """Set ``fields`` (made safe to show) and rewrite the file."""
        with _WRITE_LOCK:
            self.data.update(_safe_fields(fields))
            note = _report_notes.get(self.path.parent.resolve())
            if note is not None:
                self.data[REPORT_NOTE] = note
            else:
                self.data.pop(REPORT_NOTE, None)
            self.data["time"] = time.time()
            atomic_write_json(self.path, self.data)

    def asked(self, message_type: str, n: int) -> None:
        """``n`` requests of ``message_type`` went out."""
        phase = _PHASES.get(message_type.split(".")[0], message_type)
        if message_type.startswith("train") and "." in message_type:
            phase = "fine-tuning"
        fields: dict[str, Any] = {"phase": phase, "sites_asked": n}
        fields["sites_answered"] = 0
        if phase == "training" or self.data["round_started"] is None:
            fields["round_started"] = time.time()
        self.update(**fields)

    def answered(self, n: int) -> None:
        """``n`` more sites answered the requests in flight."""
        if n:
            self.update(sites_answered=int(self.data["sites_answered"]) + n)

    def round_done(self, rnd: int) -> None:
        """Round ``rnd`` is checkpointed and in ``metrics.jsonl``."""
        self.update(
            state="running",
            rounds_done=rnd,
            phase="",
            sites_asked=0,
            sites_answered=0,
            round_started=None,
        )


class ProgressGrid:
    """A grid that tells :class:`RunStatus` what it sends and what comes back.

    Every attribute but ``push_messages`` and ``pull_messages`` is the wrapped
    grid's; those two are passed through unchanged.
    """

    def __init__(self, grid: Any, status: RunStatus) -> None:
        self._grid = grid
        self._status = status

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        """Push, then record how many requests of which kind went out."""
        messages = list(messages)
        for msg in messages:  # the SuperNode then logs [RUN r, ROUND n]
            with contextlib.suppress(AttributeError, KeyError, TypeError, ValueError):
                rnd = int(msg.content.config_records["config"]["server-round"])
                msg.metadata.group_id = msg.metadata.group_id or str(rnd)
        ids = list(self._grid.push_messages(messages))
        if messages:
            self._status.asked(str(messages[0].metadata.message_type), len(messages))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        """Pull, then record how many replies came in."""
        replies = list(self._grid.pull_messages(message_ids))
        self._status.answered(len(replies))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def note_report(run_dir: Path, note: str | None) -> None:
    """Say in ``status.json`` why the report was not drawn (``note``), or that
    it now is (None: the key goes).

    A run's own :class:`RunStatus` in this process keeps the note in every
    later write; with no ``status.json`` (a folder that is no run) nothing is
    written.
    """
    run_dir = Path(run_dir).resolve()
    note = None if note is None else safe_text(note, MESSAGE_LIMIT)
    with _WRITE_LOCK:
        _report_notes[run_dir] = note
        data = read_status(run_dir)
        if not data or data.get(REPORT_NOTE) == note:
            return
        if note is None:
            data.pop(REPORT_NOTE, None)
        else:
            data[REPORT_NOTE] = note
        atomic_write_json(run_dir / STATUS_FILE, data)


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's ``status.json``; empty when there is none or it is unreadable.

    Its values are made safe to show again (as when written): the file may
    come from an older coordinator, or have been edited.
    """
    try:
        data = json.loads((Path(run_dir) / STATUS_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return _safe_fields(data) if isinstance(data, dict) else {}


def _int(v: Any) -> int:
    return int(v) if isinstance(v, int | float) and abs(v) < 2**53 else 0


def _clock(t: Any) -> str:
    if not isinstance(t, int | float) or not 0 < t < 2**40:
        return "-"
    return time.strftime("%H:%M", time.localtime(float(t)))


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return (
        f"{h}:{rest // 60:02d}:{rest % 60:02d}"
        if h
        else f"{rest // 60}:{rest % 60:02d}"
    )


def progress_text(status: dict[str, Any], now: float | None = None) -> str:
    """The running round in words: phase, sites answered and still working,
    elapsed time. Empty between rounds."""
    started = status.get("round_started")
    if not status.get("phase") or not isinstance(started, int | float):
        return ""
    now = time.time() if now is None else now
    asked, got = _int(status.get("sites_asked", 0)), _int(status.get("sites_answered"))
    rnd = _int(status.get("rounds_done", 0)) + 1
    phase = safe_text(status["phase"], 80)
    total = safe_text(status.get("rounds_total", "?"), 20)
    return (
        f"round {rnd} of {total}: {phase}, "
        f"{got} of {asked} sites answered, {asked - got} working, "
        f"{_duration(min(now - float(started), 1e9))} elapsed"
    )


def status_line(status: dict[str, Any]) -> str:
    """One sentence: state, rounds, last update.

    The round in progress and the rounds completed are named apart (``round
    4 of 10 in progress (training), 3 completed, updated 12:04``): during a
    round, ``rounds_done`` is the round before it, and "round 3 of 10" alone
    read as the round running. Between rounds, or once the run is over, the
    last completed round is shown (``round 3 of 10, updated 12:04``), and a
    live run says the next round has not started.
    """
    if not status:
        return "no status.json: the run has not started"
    state = safe_text(status.get("state", "unknown"), 40)
    done = _int(status.get("rounds_done", 0))
    total = _int(status.get("rounds_total"))
    of_total = f" of {total}" if total else ""
    live = status.get("state") in LIVE_STATES
    updated = f"updated {_clock(status.get('time'))}"
    if live and status.get("phase"):
        phase = safe_text(status["phase"], 80)
        text = (
            f"{state}: round {done + 1}{of_total} in progress ({phase}), "
            f"{done} completed, {updated}"
        )
    else:
        rounds = f"round {done}{of_total}" if total else f"{done} round(s) done"
        text = f"{state}: {rounds}, {updated}"
        if live and (not total or done < total):
            text += f"; round {done + 1} not started yet"
    if status.get("message"):
        text += f" ({safe_text(status['message'], MESSAGE_LIMIT)})"
    if status.get(REPORT_NOTE):
        text += f"; {safe_text(status[REPORT_NOTE], MESSAGE_LIMIT)}"
    return text
