"""What the coordinator keeps at the end of every round, and of the run.

After each round's evaluation :class:`RoundEnd` checkpoints the global model
with a self-describing sidecar (``server/checkpoint.py``; with ``ema-decay``
also the moving average the round evaluated), appends the round's
line to ``metrics.jsonl``, updates ``status.json`` and asks for a fresh
``report.html``. A round whose aggregate was not kept (``aggregate_failed``)
checkpoints the model it started from, the last good one, and ``status.json``
says so. No Flower here: the model arrives as anything with
``to_torch_state_dict()``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from common.artifacts import PREPROCESSING_KEY
from common.config import Plan
from common.scans import SEEN_SCANS_KEY
from server.checkpoint import INITIAL_KEY, MAX_EPSILON_SPENT_KEY, save_checkpoint
from server.reporting.live_report import LiveReport
from server.reporting.metrics_log import (
    append_metrics,
    last_known_privacy,
    read_metrics,
    round_entry,
    round_line,
)
from server.reporting.round_record import RoundRecord
from server.reporting.status import RunStatus

log = logging.getLogger("kidneyfl.server")


class _Arrays(Protocol):
    def to_torch_state_dict(self) -> dict[str, Any]: ...


def state_sha(state: dict) -> str:
    """SHA-256 that identifies global weights exactly (logged on resume, tested)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class RunMeta:
    """What every checkpoint of a run says about how its model was made."""

    plan: Plan
    preprocessing: dict[str, Any]
    seen_scans: Any = None
    origin: dict[str, Any] | None = None  # the pretrained start, if any

    def sidecar(self) -> dict[str, Any]:
        """The sidecar keys every checkpoint of the run carries."""
        return {
            "plan": self.plan.model_dump(by_alias=True, mode="json"),
            "plan_fingerprint": json.loads(json.dumps(self.plan.fingerprint())),
            "model": self.plan.model,
            PREPROCESSING_KEY: self.preprocessing,
            SEEN_SCANS_KEY: self.seen_scans,
            INITIAL_KEY: self.origin,
        }


class RoundEnd:
    """The ``on_round_end`` callback of the strategy wrapper (``SiteAwareStrategy``).

    Parameters
    ----------
    run_dir : Path
        The run's folder; checkpoints go to ``checkpoints/`` inside it.
    meta : RunMeta
        What every sidecar says about the run.
    status : RunStatus
        The run's ``status.json``.
    reports : LiveReport
        Rewrites ``report.html`` beside the round loop.
    server_state : callable
        The strategy's server optimiser state, saved with each checkpoint.
    ema : callable, optional
        The moving average of the global model (``ema-decay``), or None; saved
        with each checkpoint beside the global model.
    """

    def __init__(
        self,
        run_dir: Path,
        meta: RunMeta,
        status: RunStatus,
        reports: LiveReport,
        server_state: Callable[[], dict[str, np.ndarray]],
        ema: Callable[[], dict[str, torch.Tensor] | None] = lambda: None,
    ) -> None:
        self.run_dir = run_dir
        self.meta = meta
        self.status = status
        self.reports = reports
        self.server_state = server_state
        self.ema = ema

    def __call__(self, rec: RoundRecord, arrays: _Arrays) -> None:
        """Checkpoint round ``rec`` with ``arrays``, log it, refresh the report."""
        entry = round_entry(rec)
        entry["time"] = time.time()
        state = arrays.to_torch_state_dict()
        entry["global_sha256"] = state_sha(state)
        ema = self.ema()
        if ema is not None:  # the model this round's evaluation measured
            entry["ema_sha256"] = state_sha(ema)
        save_checkpoint(
            self.run_dir / "checkpoints",
            rec.round,
            state,
            self._sidecar(rec, entry),
            server_state=self.server_state(),
            ema_state=None if ema is None else OrderedDict(ema),
        )
        # what earlier rounds said of each site, for a site with no reply now
        known = last_known_privacy(read_metrics(self.run_dir))
        append_metrics(self.run_dir, entry)
        self.status.round_done(rec.round)
        if rec.aggregate_failed:  # the checkpoint above is the last good model
            self.status.update(
                message=f"round {rec.round}: aggregate not kept "
                f"({rec.aggregate_failed}); the global model is the last good one"
            )
        log.info("%s", round_line(entry, known))
        self.reports.request()

    def _sidecar(self, rec: RoundRecord, entry: dict[str, Any]) -> dict[str, Any]:
        spent = [e for e in entry["epsilon"].values() if e is not None]
        return {
            "entry": entry,
            **self.meta.sidecar(),
            "metrics": entry["weighted"],
            "epsilon_per_site": entry["epsilon"],
            MAX_EPSILON_SPENT_KEY: max(spent, default=None),
            "sites": sorted(set(rec.train) | set(rec.evaluate)),
        }
