"""Progress of a long step loop (pretraining): what it will take, and where it is.

On a terminal a live line shows the steps, the rate, the time left and the
current loss (rich, which comes with flwr), with the start, the expected time
and the end printed above it. Anywhere else (a pipe, a log file, CI) plain log
lines say the same at the start, once the first steps give a rate (the
expected time), every ``every_s`` seconds and at the end.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any

log = logging.getLogger("kidneyfl.progress")


def duration(seconds: float) -> str:
    """``1 h 02 min``, ``4 min 05 s`` or ``12 s``."""
    s = max(0, int(round(seconds)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


class StepProgress:
    """Report ``total`` steps of ``what`` as they run.

    Parameters
    ----------
    total : int
        Steps the loop will take.
    what : str
        What runs, for the lines (``pretraining unet-tiny on 150 cases``).
    out : file, optional
        Where the live line goes (default: stderr); it is drawn only when
        ``out`` is a terminal, unless ``live`` says otherwise.
    every_s : float
        Seconds between plain progress lines.
    warm_steps : int
        Steps left out of the estimate (the first steps also pay one-off
        costs: the preprocessing cache filled on the first epoch,
        allocations); the expected time is said after as many more, from
        their rate. Measured: the demo's pretraining took 1.3 s a step over its
        first 5 steps and 0.38 s a step after, so an estimate from the first
        steps said 16 minutes for a 4.5-minute run.
    clock : callable
        Seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        total: int,
        what: str,
        *,
        out: IO[str] | None = None,
        live: bool | None = None,
        every_s: float = 15.0,
        warm_steps: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.what, self.every_s = max(1, total), what, every_s
        self.warm_steps, self.clock = max(1, warm_steps), clock
        self.out = out if out is not None else sys.stderr
        self.live = self.out.isatty() if live is None else live
        self._bar: Any = None
        self._task: Any = None
        self.start = self.last_line = 0.0
        self.warm_at: tuple[int, float] | None = None
        self.loss = math.nan

    def _say(self, text: str) -> None:
        """A line above the live bar on a terminal; a log line elsewhere."""
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            log.info("%s", text)

    def __enter__(self) -> StepProgress:
        self.start = self.last_line = self.clock()
        if self.live:
            self._bar = _rich_bar(self.out)
            if self._bar is not None:
                self._bar.start()
                self._task = self._bar.add_task(self.what, total=self.total, loss="-")
        self._say(
            f"{self.what}: {self.total} steps; the expected time follows the "
            "first steps"
        )
        return self

    def __exit__(self, *exc: object) -> None:
        done = "stopped" if exc[0] is not None else "done"
        self._say(f"{self.what}: {done} in {duration(self.clock() - self.start)}")
        if self._bar is not None:
            self._bar.stop()

    def rate(self, steps: int, now: float) -> float:
        """Steps per second since the warm-up steps (or since the start)."""
        if self.warm_at is not None and steps > self.warm_at[0]:
            n0, t0 = self.warm_at
            return (steps - n0) / max(now - t0, 1e-9)
        return steps / max(now - self.start, 1e-9)

    def __call__(self, steps: int, loss: float) -> None:
        """One step done (``client.train.local_train``'s ``on_step``)."""
        now = self.clock()
        if math.isfinite(loss):
            self.loss = loss
        if steps == self.warm_steps and self.warm_at is None:
            self.warm_at = (steps, now)
        if steps == min(2 * self.warm_steps, self.total) and self.warm_at:
            rate = self.rate(steps, now)
            left = (self.total - steps) / rate if rate > 0 else 0.0
            self._say(
                f"{self.what}: about {duration(now - self.start + left)} in all "
                f"({1 / rate:.2f} s a step after the first {self.warm_at[0]})"
            )
        if self._bar is not None:  # the bar shows where it is
            self._bar.update(self._task, completed=steps, loss=f"{self.loss:.4f}")
        elif steps >= self.total or now - self.last_line >= self.every_s:
            self.last_line = now
            log.info("%s", self.line(steps, now))

    def line(self, steps: int, now: float) -> str:
        """``step 120/720 (17%), 2.1 steps/s, loss 0.5120, about 4 min 45 s left``."""
        rate = self.rate(steps, now)
        left = (self.total - steps) / rate if rate > 0 else math.inf
        eta = duration(left) if math.isfinite(left) else "unknown"
        return (
            f"step {steps}/{self.total} ({100 * steps // self.total}%), "
            f"{rate:.2f} steps/s, loss {self.loss:.4f}, about {eta} left"
        )


def _rich_bar(out: IO[str]) -> Any:
    """rich's progress bar on ``out``: steps, rate, time left, loss; None
    without rich."""
    try:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text
    except ImportError:  # pragma: no cover - rich comes with flwr
        return None

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed or 0.0:.2f} steps/s")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]}"),
        console=Console(file=out, force_terminal=True),
        transient=True,
    )
