"""The federated preprocessing plan: one query round before training.

Every site answers with its dataset fingerprint (aggregates only,
``common/fingerprint.py``); the coordinator combines them into one
preprocessing plan (spacing, HU window, patch size, intensity normalisation),
saves it as ``preprocessing.json`` beside the run, and sends it to the sites
with every round's config.

The replies are read as every round's are (``server/strategy/reply_filter.py``):
each in its own catch-all, held to the wire contract (the fingerprint's keys,
list lengths and ranges, ``n-cases`` a whole number up to
``max-site-examples``), named by the node's registered name or a valid
declared one. A reply that breaks it is listed in ``preprocessing.json`` under
``rejected``, and the plan is made from the others, no site's share of it over
``max-site-weight`` (:func:`common.fingerprint.combine`).
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
from common.contract import ReplyRules, safe_text
from common.fingerprint import combine
from common.scans import SEEN_SCANS_KEY, seen_scans
from server.strategy.reply_filter import Intake, query_results
from server.strategy.round_sites import RoundSites

log = logging.getLogger("kidneyfl.server")

PREPROCESSING_FILE = "preprocessing.json"


def federated_preprocessing(grid: Grid, plan: Plan, run_dir: Path, run_id: str) -> dict:
    """Ask every site for its dataset fingerprint and combine them; saved as
    ``preprocessing.json`` beside the run (and reused when the run resumes)."""
    path = run_dir / PREPROCESSING_FILE
    if path.exists():
        return json.loads(path.read_text())
    prints, refused, rejected = _fingerprints(grid, plan, run_id)
    if len(prints) < plan.min_sites:
        raise RuntimeError(
            f"fingerprint round: {len(prints)} site(s) answered, {plan.min_sites} "
            f"needed; refusals: {refused}; rejected: {rejected}"
        )
    # bounded compute; no site's share of the plan over max-site-weight
    prep = combine(prints, max_patch=plan.patch_size, cap=plan.max_site_weight)
    prep["refused"] = refused
    prep["rejected"] = rejected
    prep[SEEN_SCANS_KEY] = seen_scans(prints)  # for predict's input check
    atomic_write_json(path, prep)
    log.info("federated preprocessing plan: %s", prep)
    return prep


def _fingerprints(
    grid: Grid, plan: Plan, run_id: str
) -> tuple[dict[str, dict[str, Any]], dict[str, str], dict[str, str]]:
    """The sites' fingerprints by site, why the others gave none (failures and
    refusals), and the replies rejected by the contract.

    The query carries the run id: each site counts it against the run's
    allowance of releases (client/request_guard.py).
    """
    config = ConfigRecord(
        {wire.FINGERPRINT_MIN_CASES: plan.fingerprint_min_cases, wire.RUN_ID: run_id}
    )
    sites = RoundSites()
    sites.refresh(grid)  # registered names, where nodes have them
    messages = sites.ask(
        Message(
            content=RecordDict({wire.CONFIG: config}),
            message_type=MessageType.QUERY,
            dst_node_id=node,
        )
        for node in grid.get_node_ids()
    )
    replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout))
    intake = Intake(wire.MSG_QUERY, ReplyRules.from_plan(plan))
    prints, result = query_results(replies, sites.site_of, intake)
    refused = {**result.failed, **result.refused}
    for site, why in refused.items():
        log.warning("site %s gave no fingerprint: %s", site, safe_text(why))
    return prints, refused, result.rejected


def preprocessing_config(prep: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing plan as the config keys every round sends the sites."""
    return {
        wire.PREP_SPACING: [float(v) for v in prep["spacing-mm"]],
        wire.PREP_WINDOW: [float(v) for v in prep["hu-window"]],
        wire.PREP_PATCH: [int(v) for v in prep["patch-size"]],
        wire.PREP_MEAN: float(prep["foreground-mean"]),
        wire.PREP_STD: float(prep["foreground-std"]),
    }
