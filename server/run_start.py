"""Where a run starts: the seeded model, a pretrained one, or its last round.

A new run starts from the plan's seeded initialisation, or from a pretrained
checkpoint (``initial-checkpoint``, provenance kept for every sidecar). With
``resume=true`` a run continues from its latest checkpoint, which must match
the plan; without it a run folder that already holds checkpoints is refused,
so nothing is ever overwritten.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import Plan
from common.norm_layers import require_norm_params
from common.task_models import build_plan_model
from common.weights import import_state
from server.checkpoint import (
    LATEST,
    CheckpointError,
    load_checkpoint,
    load_ema,
    load_initial,
    load_server_state,
)
from server.recovery import reconcile_metrics
from server.round_end import state_sha

log = logging.getLogger("kidneyfl.server")


@dataclass
class StartPoint:
    """The global model a run starts from, and how many rounds are behind it."""

    state: OrderedDict[str, torch.Tensor]
    done: int = 0
    server_state: dict[str, np.ndarray] = field(default_factory=dict)
    origin: dict[str, Any] | None = None  # the pretrained checkpoint, if any
    # the moving average of the global model (ema-decay), when resumed with one
    ema: OrderedDict[str, torch.Tensor] | None = None


def start_point(plan: Plan, run_dir: Path) -> StartPoint:
    """The run's starting model: resumed, pretrained or seeded.

    Raises
    ------
    CheckpointError
        If the run folder holds checkpoints and the plan does not resume, or
        the latest checkpoint does not match the plan.
    """
    start = _initial_model(plan)
    ckpt_dir = run_dir / "checkpoints"
    if not (ckpt_dir / LATEST).exists():
        return start
    if not plan.resume:
        raise CheckpointError(
            f"{run_dir} already holds checkpoints; pass resume=true to continue it or "
            "choose another run-name (nothing was overwritten)"
        )
    state, meta = load_checkpoint(ckpt_dir, plan.fingerprint())
    done = int(meta["round"])
    server_state = load_server_state(ckpt_dir, meta)
    ema = load_ema(ckpt_dir, meta)
    reconcile_metrics(run_dir, ckpt_dir, done)
    log.info(
        "resumed %s from round %d (global weights sha256 %s)",
        run_dir.name,
        done,
        state_sha(state),
    )
    if ema is not None:
        log.info("moving average of round %d: sha256 %s", done, state_sha(ema))
    return StartPoint(state, done, server_state, start.origin, ema)


def _initial_model(plan: Plan) -> StartPoint:
    """The plan's seeded model, or the pretrained checkpoint it names."""
    model = build_plan_model(plan)
    if plan.fedbn:
        require_norm_params(model, plan.model)
    if not plan.initial_checkpoint:
        return StartPoint(model.state_dict())
    state, origin = load_initial(Path(plan.initial_checkpoint), plan.task, plan.model)
    import_state(model, state)  # every key and shape, or an error
    log.info(
        "starting from %s (pretrained on %s, licence %s, sha256 %s)",
        origin["path"],
        origin["dataset"],
        origin["licence"],
        origin["sha256"][:16],
    )
    return StartPoint(model.state_dict(), origin=origin)
