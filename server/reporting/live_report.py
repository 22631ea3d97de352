"""``report.html`` rewritten while a run goes on, never delaying a round."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from server.reporting.html import write_report

log = logging.getLogger("kidneyfl.server")


def live_report(run_dir: Path) -> None:
    """Rewrite ``report.html`` from what the run holds now; never fails the run."""
    try:
        write_report(run_dir)
    except Exception:  # noqa: BLE001 - the report is a view; the round is saved
        log.warning("could not rewrite the live report", exc_info=True)


class LiveReport:
    """Rewrites the report beside the round loop, so plotting never delays a
    round; a request while one is being written makes one more pass after it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
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
            live_report(self.run_dir)
            with self._lock:
                if not self._again:
                    self._busy = False
                    return
                self._again = False

    def wait(self) -> None:
        """Block until no rewrite is in progress."""
        if self._thread is not None:
            self._thread.join()
