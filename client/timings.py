"""Where a site's time goes, kept at the site (``<state_dir>/timings.jsonl``).

One line per message the site answered: data loading and the work itself
(training or evaluation), in seconds. The file never leaves the site; hospital
IT can read how long its rounds take, and ``benchmarks/e2e_demo.py`` reads it
to split the demo's time into phases.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from common.config import SiteConfig

log = logging.getLogger("kidneyfl.client")

TIMINGS_FILE = "timings.jsonl"


def record_timing(
    site: SiteConfig, run_id: str, rnd: int, kind: str, load_s: float, work_s: float
) -> None:
    """Append one line; a failure to write is logged, never raised."""
    line = json.dumps(
        {
            "time": time.time(),
            "run_id": run_id,
            "round": rnd,
            "kind": kind,
            "load_s": round(load_s, 4),
            "work_s": round(work_s, 4),
        }
    )
    path = Path(site.state_dir) / TIMINGS_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, (line + "\n").encode())  # one write: lines never interleave
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("could not write %s: %s", path, exc)


def read_timings(state_dir: Path) -> list[dict]:
    """The site's timing lines (skipping a torn last line)."""
    path = Path(state_dir) / TIMINGS_FILE
    out = []
    if path.exists():
        for raw in path.read_text().splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
    return out
