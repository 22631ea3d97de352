"""``runs/<run>/status.json``: where a run is, rewritten atomically as it goes.

The coordinator writes it when the run starts, when it sends a round's
requests, when each site answers and when a round ends; the terminal of
``kidneyfl simulate``, ``kidneyfl status`` and the live ``report.html`` all
read it. :class:`ProgressGrid` is the hook: it wraps the grid the strategy
sends through, so Flower's round loop stays untouched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_json

STATUS_FILE = "status.json"
LIVE_STATES = ("starting", "waiting-for-sites", "running")
_PHASES = {"train": "training", "evaluate": "evaluating", "query": "fingerprint"}


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
        """Set ``fields`` and rewrite the file."""
        self.data.update(fields)
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


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run's ``status.json``; empty when there is none or it is unreadable."""
    try:
        return dict(json.loads((Path(run_dir) / STATUS_FILE).read_text()))
    except (OSError, ValueError):
        return {}


def _clock(t: Any) -> str:
    return time.strftime("%H:%M", time.localtime(float(t))) if t else "-"


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
    if not status.get("phase") or not status.get("round_started"):
        return ""
    now = time.time() if now is None else now
    asked, got = int(status.get("sites_asked", 0)), int(status.get("sites_answered", 0))
    rnd = int(status.get("rounds_done", 0)) + 1
    return (
        f"round {rnd} of {status.get('rounds_total', '?')}: {status['phase']}, "
        f"{got} of {asked} sites answered, {asked - got} working, "
        f"{_duration(now - float(status['round_started']))} elapsed"
    )


def status_line(status: dict[str, Any]) -> str:
    """One sentence: state, rounds, last update (``round 3 of 10, updated 12:04``)."""
    if not status:
        return "no status.json: the run has not started"
    state = str(status.get("state", "unknown"))
    done, total = status.get("rounds_done", 0), status.get("rounds_total")
    rounds = f"round {done} of {total}" if total else f"{done} round(s) done"
    text = f"{state}: {rounds}, updated {_clock(status.get('time'))}"
    if status.get("message"):
        text += f" ({status['message']})"
    return text
