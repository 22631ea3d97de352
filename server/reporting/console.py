"""The terminal of ``kidneyfl simulate``: a banner, one line per round, a summary.

What ``flwr run --stream`` prints (Flower's log, each line twice, once coloured
and once with a timestamp; Ray's messages; every site's log) goes to
``runs/<run>/logs/flwr.log`` in full. The terminal shows, by default:

- the round lines, read from ``metrics.jsonl`` as the coordinator appends them;
- on a terminal, a progress line for the running round (phase, sites answered,
  sites still working, elapsed), read from ``status.json`` (rich's ``Live``);
- error lines from the stream, once each.

``verbose`` also shows the stream itself, each line once.

Every line, shown or logged, passes :func:`server.reporting.text.safe_text`:
the stream carries the coordinator's log, which names sites and quotes their
refusals, so no escape code or control character a site chose reaches the
operator's terminal or ``flwr.log``.
"""

from __future__ import annotations

import collections
import re
import threading
from pathlib import Path
from typing import IO, Any

from server.reporting.metrics_log import (
    last_known_privacy,
    read_metrics,
    read_start,
    round_line,
)
from server.reporting.status import progress_text, read_status
from server.reporting.text import safe_text

# The longest line kept of the stream (a traceback line, a Ray message): long
# enough for any honest line, short enough that no reply floods the terminal.
LINE_LIMIT = 4000
_LEVELS = "DEBUG|INFO|WARNING|ERROR|CRITICAL"
_STAMPED = re.compile(rf"^\d\d/\d\d/\d{{4}} \d\d:\d\d:\d\d:({_LEVELS}):(.*)$")
_COLOURED = re.compile(rf"^({_LEVELS})\s*:(.*)$")
_OURS = re.compile(rf"(^|\) )({_LEVELS}) (kidneyfl|client|server|common)[.\w]*: ")


def strip_ansi(line: str) -> str:
    """``line`` without terminal escape codes, control characters and trailing
    whitespace, cut to :data:`LINE_LIMIT` (Flower colours its lines; a site
    may have put anything in what the coordinator logs)."""
    return safe_text(line, LINE_LIMIT).rstrip()


def normalise(line: str) -> tuple[str, str]:
    """``(level, message)`` of a stream line, whichever of Flower's two formats
    (coloured, or with a timestamp) it came in; level is "" for other lines."""
    text = strip_ansi(line)
    for pattern in (_STAMPED, _COLOURED):
        m = pattern.match(text)
        if m:
            return m.group(1), m.group(2).strip()
    m = _OURS.search(text)
    return (m.group(2) if m else ""), text.strip()


class Deduplicator:
    """Drops a line that repeats one of the last ``window`` lines (Flower prints
    each of its records twice, a few lines apart)."""

    def __init__(self, window: int = 32) -> None:
        self._recent: collections.deque[tuple[str, str]] = collections.deque(
            maxlen=window
        )

    def seen(self, key: tuple[str, str]) -> bool:
        """True when ``key`` was among the recent lines; records it otherwise."""
        if key in self._recent:
            return True
        self._recent.append(key)
        return False


def shown_by_default(level: str, message: str) -> bool:
    """Stream lines the quiet terminal still shows: errors."""
    return level in ("ERROR", "CRITICAL") and bool(message)


class RunConsole:
    """Shows a running simulation; see the module docstring.

    Parameters
    ----------
    run_dir : Path
        The run's folder (``metrics.jsonl``, ``status.json``).
    log_path : Path
        Where the whole stream is written.
    out : file, optional
        The terminal; None shows nothing (everything still goes to the log).
    verbose : bool
        Show the stream (Flower's and Ray's own logs), each line once.
    live : bool, optional
        Show the progress line; default: when ``out`` is a terminal.
    """

    def __init__(
        self,
        run_dir: Path,
        log_path: Path,
        out: IO[str] | None,
        verbose: bool = False,
        live: bool | None = None,
        poll_s: float = 0.5,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.verbose = verbose
        self.shown: list[str] = []  # what reached the terminal, for tests
        self._out = out
        self._dedup = Deduplicator()
        self._rounds_seen = len(read_metrics(self.run_dir))
        self._start_seen = read_start(self.run_dir) is not None  # resumed: shown
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("a", encoding="utf-8")
        self._console: Any = None
        self._live: Any = None
        if out is not None:
            self._console, self._live = _rich(out, live)
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> RunConsole:
        if self._live is not None:
            self._live.start()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()
        if self._live is not None:
            self._live.update("")
            self._live.stop()
        self._log.close()

    def say(self, text: str) -> None:
        """Print ``text`` (one or more lines) on the terminal and in the log."""
        text = "\n".join(strip_ansi(line) for line in text.splitlines())
        with self._lock:
            self._log.write(text + "\n")
            self._log.flush()
            if self._out is None:
                return
            self.shown.extend(text.splitlines())
            self._print(text)

    def _print(self, text: str) -> None:
        # the caller holds the lock
        if self._console is not None:
            self._console.print(
                text, markup=False, highlight=False, emoji=False, soft_wrap=True
            )
        else:
            self._out.write(text + "\n")
            self._out.flush()

    def stream_line(self, raw: str) -> None:
        """One line of ``flwr run``'s output: logged; shown if it should be."""
        text = strip_ansi(raw)
        with self._lock:
            self._log.write(text + "\n")
        level, message = normalise(raw)
        if not message or self._dedup.seen((level, message)):
            return
        if self.verbose or shown_by_default(level, message):
            self._show(text)

    def _show(self, text: str) -> None:
        with self._lock:
            if self._out is None:
                return
            self.shown.append(text)
            self._print(text)

    def poll(self) -> None:
        """Print round lines not yet shown; refresh the progress line."""
        entries = read_metrics(self.run_dir)
        if not self._start_seen and (start := read_start(self.run_dir)) is not None:
            self._start_seen = True  # the pretrained start, before round 1
            if not self.verbose:
                self.say(round_line(start))
        for i in range(self._rounds_seen, len(entries)):
            if not self.verbose:  # verbose: the coordinator's own line is shown
                # a site silent this round shows the epsilon it last reported
                self.say(round_line(entries[i], last_known_privacy(entries[:i])))
        self._rounds_seen = max(self._rounds_seen, len(entries))
        if self._live is not None:
            self._live.update(progress_text(read_status(self.run_dir)))

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a display glitch must not stop a run
                continue


def _rich(out: IO[str], live: bool | None) -> tuple[Any, Any]:
    """rich's Console (and Live for the progress line on a terminal); plain
    output when rich is not installed (it comes with flwr)."""
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        return None, None
    console = Console(file=out, highlight=False, soft_wrap=True)
    if live is None:
        live = console.is_terminal
    if not live:
        return console, None
    return console, Live(
        "", console=console, transient=True, refresh_per_second=2, auto_refresh=True
    )


def banner(
    run_dir: Path, plan: Any, sites: list[Any], log_dir: Path, resume: bool = False
) -> str:
    """What is about to run, in a few lines: run, plan, sites, privacy, results."""
    priv = []
    for s in sites:
        p = s.privacy
        if not p.enabled:
            priv.append(f"{s.name} DP off")
        else:
            ceiling = f", ceiling {p.max_epsilon:g}" if p.max_epsilon else ""
            delta = f"delta {p.delta:g}" if p.delta else "default delta"
            priv.append(f"{s.name} {delta}{ceiling}")
    lines = [
        f"kidneyfl {'resume' if resume else 'run'} {run_dir.name}",
        f"  plan     {plan.task}: {plan.model}, {plan.strategy}, "
        f"{plan.num_server_rounds} rounds x {plan.local_epochs} local epoch(s)",
        f"  sites    {len(sites)}: {', '.join(s.name for s in sites)}",
        f"  privacy  DP-SGD, target epsilon {plan.dp_target_epsilon:g} per site over "
        f"the run ({'; '.join(priv)})",
        f"  results  {run_dir}/ (report.html and status.json after every round)",
        f"  logs     {log_dir}/",
    ]
    return "\n".join(lines)
