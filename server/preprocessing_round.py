"""The federated preprocessing plan: one query round before training.

Every site answers with its dataset fingerprint (aggregates only,
``common/fingerprint.py``); the coordinator combines them into one
preprocessing plan (spacing, HU window, patch size, intensity normalisation),
saves it as ``preprocessing.json`` beside the run, and sends it to the sites
with every round's config.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import wire
from common.atomic import atomic_write_json
from common.config import Plan
from common.fingerprint import combine
from common.scans import SEEN_SCANS_KEY, seen_scans

log = logging.getLogger("kidneyfl.server")

PREPROCESSING_FILE = "preprocessing.json"


def federated_preprocessing(grid: Grid, plan: Plan, run_dir: Path, run_id: str) -> dict:
    """Ask every site for its dataset fingerprint and combine them; saved as
    ``preprocessing.json`` beside the run (and reused when the run resumes)."""
    path = run_dir / PREPROCESSING_FILE
    if path.exists():
        return json.loads(path.read_text())
    prints, refused = _fingerprints(grid, plan, run_id)
    if len(prints) < plan.min_sites:
        raise RuntimeError(
            f"fingerprint round: {len(prints)} site(s) answered, {plan.min_sites} "
            f"needed; refusals: {refused}"
        )
    prep = combine(prints, max_patch=plan.patch_size)  # bounded compute
    prep["refused"] = refused
    prep[SEEN_SCANS_KEY] = seen_scans(prints)  # for predict's input check
    atomic_write_json(path, prep)
    log.info("federated preprocessing plan: %s", prep)
    return prep


def _fingerprints(
    grid: Grid, plan: Plan, run_id: str
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The sites' fingerprints by site, and why the others gave none.

    The query carries the run id: each site counts it against the run's
    allowance of releases (client/request_guard.py).
    """
    config = ConfigRecord(
        {wire.FINGERPRINT_MIN_CASES: plan.fingerprint_min_cases, wire.RUN_ID: run_id}
    )
    messages = [
        Message(
            content=RecordDict({wire.CONFIG: config}),
            message_type=MessageType.QUERY,
            dst_node_id=node,
        )
        for node in grid.get_node_ids()
    ]
    prints, refused = {}, {}
    for reply in grid.send_and_receive(messages, timeout=plan.round_timeout):
        if reply.has_error():
            refused[f"node-{reply.metadata.src_node_id}"] = str(reply.error.reason)
            continue
        site = reply.content[wire.SITE]
        name = str(site.get(wire.SITE_NAME, f"node-{reply.metadata.src_node_id}"))
        metrics = reply.content[wire.METRICS]
        if metrics.get(wire.REFUSED, 0):
            refused[name] = str(site.get(wire.REFUSAL_REASON, "refused"))
        else:
            prints[name] = dict(metrics)
    return prints, refused


def preprocessing_config(prep: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing plan as the config keys every round sends the sites."""
    return {
        wire.PREP_SPACING: [float(v) for v in prep["spacing-mm"]],
        wire.PREP_WINDOW: [float(v) for v in prep["hu-window"]],
        wire.PREP_PATCH: [int(v) for v in prep["patch-size"]],
        wire.PREP_MEAN: float(prep["foreground-mean"]),
        wire.PREP_STD: float(prep["foreground-std"]),
    }
