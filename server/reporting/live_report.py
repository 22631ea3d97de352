"""``report.html`` drawn with a time limit: rewritten while a run goes on, never
delaying a round, never holding the end of a run.

Drawing is bounded twice. What is drawn is capped (``figures.drawn_entries``),
so an honest or hostile round costs about the same; and every drawing runs in
a worker thread that the coordinator waits for at most
:data:`REPORT_TIME_LIMIT_S` (:func:`draw_bounded`). A drawing that takes
longer is left to finish on its own (a daemon thread: it never keeps the
process alive), the run goes on or ends, and ``status.json`` and the log say
the report was not drawn and how to redraw it (``kidneyfl report runs/<run>``).
While one drawing of a run is still going, no second one starts, so a stuck
drawing never piles up threads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.reporting.html import write_report
from server.reporting.status import note_report

log = logging.getLogger("kidneyfl.server")

# How long the coordinator waits for a drawing of the report. An honest report
# of a long run draws in seconds; the limit only matters when something is
# wrong, and then the run must not wait on it.
REPORT_TIME_LIMIT_S = 120.0

_lock = threading.Lock()
_drawing: dict[Path, threading.Thread] = {}  # run folder -> its drawing thread


def redraw_hint(run_dir: Path) -> str:
    """The command that draws the report again."""
    return f"redraw it with `kidneyfl report {run_dir}`"


def draw_bounded(
    run_dir: Path, draw: Callable[[], Any], time_limit_s: float = REPORT_TIME_LIMIT_S
) -> bool:
    """Run ``draw`` (a drawing of ``run_dir``'s report) for at most ``time_limit_s``.

    Returns True when it finished in time. Otherwise (too slow, an error, or
    an earlier drawing of this run still going) it returns False, logs a
    warning and records in ``status.json`` that the report was not drawn and
    how to redraw it; a drawing that finishes late clears that note. Never
    raises: the report is a view, and the run's records are already saved.
    """
    run_dir = Path(run_dir).resolve()
    with _lock:
        earlier = _drawing.get(run_dir)
        if earlier is not None and earlier.is_alive():
            _not_drawn(run_dir, "an earlier drawing of the report is still going", None)
            return False
        state: dict[str, Any] = {"done": False, "late": False, "error": None}
        worker = threading.Thread(
            target=_work, args=(run_dir, draw, state), daemon=True, name="report"
        )
        _drawing[run_dir] = worker
        worker.start()
    worker.join(time_limit_s)
    with _lock:
        if not state["done"]:
            state["late"] = True
            why = f"drawing took longer than {time_limit_s:g} s"
            _not_drawn(run_dir, why, None)
            return False
    if state["error"] is not None:
        _not_drawn(run_dir, "drawing failed", state["error"])
        return False
    return True


def _work(run_dir: Path, draw: Callable[[], Any], state: dict[str, Any]) -> None:
    error: Exception | None = None
    try:
        draw()
    except Exception as exc:  # noqa: BLE001 - draw_bounded reports it
        error = exc
    with _lock:
        state["done"], state["error"] = True, error
        if error is None:  # drawn, on time or late: no note says otherwise
            if state["late"]:
                log.info("the report of %s was drawn after all", run_dir.name)
            try:
                note_report(run_dir, None)
            except OSError:
                log.warning("could not clear the note in status.json", exc_info=True)


def _not_drawn(run_dir: Path, why: str, error: Exception | None) -> None:
    note = f"report not drawn ({why}); {redraw_hint(run_dir)}"
    log.warning("%s", note, exc_info=error)
    try:
        note_report(run_dir, note)
    except OSError:  # a full disk must not end the run here
        log.warning("could not note it in status.json", exc_info=True)


def live_report(run_dir: Path, time_limit_s: float = REPORT_TIME_LIMIT_S) -> bool:
    """Rewrite ``report.html`` from what the run holds now, within
    ``time_limit_s``; never fails the run. True when it was drawn."""
    return draw_bounded(run_dir, lambda: write_report(run_dir), time_limit_s)


class LiveReport:
    """Rewrites the report beside the round loop, so plotting never delays a
    round; a request while one is being written makes one more pass after it."""

    def __init__(
        self, run_dir: Path, time_limit_s: float = REPORT_TIME_LIMIT_S
    ) -> None:
        self.run_dir = run_dir
        self.time_limit_s = time_limit_s
        self._lock = threading.Lock()
        self._busy = self._again = False
        self._thread: threading.Thread | None = None

    def request(self) -> None:
        """Rewrite the report soon (in a thread)."""
        with self._lock:
            if self._busy:
                self._again = True
                return
            self._busy = True
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            live_report(self.run_dir, self.time_limit_s)
            with self._lock:
                if not self._again:
                    self._busy = False
                    return
                self._again = False

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until no rewrite is in progress, or at most ``timeout_s``
        (default: two drawings' time limit, the pass going on and the one
        asked for after it). True when none is in progress."""
        if self._thread is None:
            return True
        limit = 2 * self.time_limit_s + 1 if timeout_s is None else timeout_s
        self._thread.join(limit)
        if self._thread.is_alive():
            log.warning(
                "the live report of %s is still being drawn after %g s; the run "
                "goes on without it",
                self.run_dir.name,
                limit,
            )
            return False
        return True
