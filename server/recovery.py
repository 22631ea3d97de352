"""Put a run's records back in step with its checkpoints after a crash.

The coordinator writes a round's checkpoint (whose sidecar holds the round's
``metrics.jsonl`` entry) and then appends the entry. A crash between the two,
or after the append of a round whose checkpoint never completed, leaves the
history one round off; :func:`reconcile_metrics` repairs it on resume so that
every completed round appears exactly once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from common.atomic import atomic_write_bytes
from server.reporting.metrics_log import METRICS_FILE, read_metrics

log = logging.getLogger("kidneyfl.server")


def reconcile_metrics(run_dir: Path, ckpt_dir: Path, done: int) -> list[int]:
    """Rewrite ``metrics.jsonl`` to rounds 1..``done``, once each; returns them.

    Entries for rounds after the checkpoint are dropped (they are run again);
    an entry missing for a checkpointed round is restored from its sidecar.
    """
    by_round: dict[int, dict] = {}
    for entry in read_metrics(run_dir):
        rnd = int(entry.get("round", 0))
        if 1 <= rnd <= done:
            by_round[rnd] = entry
    for rnd in range(1, done + 1):
        if rnd in by_round:
            continue
        side = ckpt_dir / f"round-{rnd:04d}.json"
        try:
            entry = json.loads(side.read_text()).get("entry")
        except (OSError, ValueError):
            entry = None
        if entry:
            by_round[rnd] = entry
            log.info("restored round %d's metrics from %s", rnd, side.name)
    rounds = sorted(by_round)
    text = "".join(json.dumps(by_round[r], sort_keys=True) + "\n" for r in rounds)
    path = run_dir / METRICS_FILE
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        atomic_write_bytes(path, text.encode("utf-8"))
    return rounds
