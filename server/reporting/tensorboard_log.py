"""TensorBoard event files for a run: ``tensorboard --logdir runs/``.

Written from ``metrics.jsonl`` (the run's record) into ``runs/<run>/tensorboard``,
replaced as a whole each time, so they always match the record: per-site
evaluation and training metrics, the weighted means, the best-worst spread and
epsilon per site, with the round as the step.

Tags name sites and metric keys, a site's own text: entries pass
``metrics_log.safe_entry`` (no control characters, bounded lengths and
counts), and at most :data:`MAX_SCALARS` values are written, so a reply with
thousands of keys cannot make the final report slow.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from server.reporting.metrics_log import safe_entry

log = logging.getLogger("kidneyfl.server")

TENSORBOARD_DIR = "tensorboard"
MAX_SCALARS = 50_000


def scalars(entries: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """``(tag, value, round)`` for every finite number a round recorded (the
    first :data:`MAX_SCALARS`)."""
    out = []
    for e in filter(None, map(safe_entry, entries)):
        if len(out) >= MAX_SCALARS:
            log.warning("tensorboard: only the first %d values written", MAX_SCALARS)
            break
        rnd = int(e["round"])
        for part in ("evaluate", "train"):
            for site, metrics in e.get(part, {}).items():
                for key, v in metrics.items():
                    if isinstance(v, int | float) and math.isfinite(v):
                        out.append((f"{part}/{key}/{site}", float(v), rnd))
        for part in ("weighted", "spread", "epsilon"):
            for key, v in e.get(part, {}).items():
                if isinstance(v, int | float) and math.isfinite(v):
                    out.append((f"{part}/{key}", float(v), rnd))
    return out[:MAX_SCALARS]


def write_events(run_dir: Path, entries: list[dict[str, Any]]) -> Path | None:
    """Rewrite the run's event files; None when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep the report going
        log.warning("tensorboard is not installed; no event files written")
        return None
    out = Path(run_dir) / TENSORBOARD_DIR
    if out.exists():
        shutil.rmtree(out)
    writer = SummaryWriter(log_dir=str(out))
    try:
        for tag, value, step in scalars(entries):
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    return out
