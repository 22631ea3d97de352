"""The post-run clinical calibration: post-processing, OOD threshold, provenance.

After the last round (segmentation runs) the coordinator sends the final model
to every site twice more, as ``evaluate`` requests (the site's part:
``client/clinical_round.py``):

1. ``clinical-stage`` 1: each site evaluates every post-processing candidate
   (``common.postprocess.CANDIDATES``) on its validation patients and sums
   the out-of-distribution features over its training patients. The
   coordinator averages each candidate's metrics over sites (case-weighted,
   under ``max-site-weight``, as every evaluation), picks the rule by
   ``common.postprocess.choose`` and pools the sums into the OOD reference
   (``common.ood.pooled_reference``).
2. ``clinical-stage`` 2: each site scores its validation patients against
   that reference and sends the share above each threshold; the coordinator
   picks the smallest threshold whose pooled share of validation patients is
   at most the target false-alarm rate (``common.ood.choose_threshold``).

Every reply is read through the reply filter, as every round's
(``server/strategy/reply_filter.py``). Every evaluate reply says whether the
site's data are synthetic; with the pretrained start's dataset that makes the
model's provenance (``training-data``). The result goes to ``clinical.json``
and into the final model's sidecar (``postprocess``, ``ood-reference``,
``training-data``), which ``kidneyfl predict`` reads. Any failure here is
logged and leaves the final model as it was: the calibration is an addition
to a finished run, never a reason to lose it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Message, MessageType
from flwr.serverapp import Grid

from common import wire
from common.atomic import atomic_write_json
from common.config import Plan
from common.contract import ReplyRules
from common.ood import choose_threshold, pooled_reference
from common.postprocess import CANDIDATES, CHOICE_KEYS, choose
from server.finetune import model_messages
from server.reporting.round_record import weighted_eval_means
from server.strategy.reply_filter import Intake, query_results

log = logging.getLogger("kidneyfl.server")

CLINICAL_FILE = "clinical.json"
POSTPROCESS_KEY = "postprocess"  # sidecar keys
OOD_KEY = "ood-reference"
TRAINING_DATA_KEY = "training-data"


def _ask(
    grid: Grid,
    plan: Plan,
    arrays: ArrayRecord,
    config: dict[str, Any],
    site_of: Callable[[Message], str],
) -> dict[str, dict[str, Any]]:
    """One evaluate request to every site; the accepted replies' metrics."""
    messages = model_messages(
        list(grid.get_node_ids()), arrays, config, MessageType.EVALUATE
    )
    replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout))
    found, result = query_results(
        replies, site_of, Intake(MessageType.EVALUATE, ReplyRules.from_plan(plan))
    )
    for site, why in {**result.refused, **result.rejected, **result.failed}.items():
        log.warning("clinical calibration: %s did not answer: %s", site, why)
    return found  # lists kept (the OOD sums and shares)


def candidate_table(
    per_site: Mapping[str, Mapping[str, Any]], cap: float = 1.0
) -> dict[str, dict[str, float]]:
    """Each candidate rule's federated metrics (case-weighted over sites)."""
    means = weighted_eval_means({s: dict(m) for s, m in per_site.items()}, cap)
    table: dict[str, dict[str, float]] = {}
    for index, rule in enumerate(CANDIDATES):
        row = {
            key: means[f"pp{index}-{key}"]
            for key in CHOICE_KEYS
            if f"pp{index}-{key}" in means
        }
        if row:
            table[rule] = row
    return table


def training_data(
    synthetic: Mapping[str, Any], origin: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The model's provenance from the sites' ``data-synthetic`` and the start.

    ``synthetic-only`` when every site that answered says its data are
    synthetic and the pretrained start (if any) was trained on phantoms.
    """
    sites = {
        site: {1: "synthetic", 0: "real"}.get(value, "unknown")
        for site, value in sorted(synthetic.items())
    }
    pretrained = None
    if origin:
        dataset = str(origin.get("dataset", "")).lower()
        pretrained = "synthetic" if "phantom" in dataset else "real"
    only = bool(sites) and all(v == "synthetic" for v in sites.values())
    return {
        "synthetic-only": only and pretrained in (None, "synthetic"),
        "sites": sites,
        "pretrained-on": pretrained,
    }


def run_clinical(
    grid: Grid,
    plan: Plan,
    run_dir: Path,
    arrays: ArrayRecord,
    base_config: dict[str, Any],
    site_of: Callable[[Message], str],
    origin: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Both stages; writes ``clinical.json``; returns the sidecar additions."""
    config = {**base_config, wire.GLOBAL_ROUND: plan.num_server_rounds}
    stage1 = _ask(grid, plan, arrays, {**config, wire.CLINICAL_STAGE: 1}, site_of)
    table = candidate_table(stage1, plan.max_site_weight)
    choice = choose(table) if table else None
    out: dict[str, Any] = {
        TRAINING_DATA_KEY: training_data(
            {s: m.get(wire.DATA_SYNTHETIC) for s, m in stage1.items()}, origin
        ),
        "candidates": table,
    }
    if choice is not None:
        out[POSTPROCESS_KEY] = {
            "rule": choice.rule,
            "reason": choice.reason,
            "before": table.get("none", {}),
            "after": table.get(choice.rule, {}),
        }
        log.info("post-processing chosen by the federation: %s", choice.reason)
    sums = [
        {"n": m[wire.OOD_N], "sum": m[wire.OOD_SUM], "sumsq": m[wire.OOD_SUMSQ]}
        for m in stage1.values()
        if wire.OOD_SUM in m and wire.OOD_SUMSQ in m and m.get(wire.OOD_N)
    ]
    if sums:
        reference = pooled_reference(sums)
        cfg2 = {
            **config,
            wire.CLINICAL_STAGE: 2,
            wire.OOD_MEAN: [float(v) for v in reference["mean"]],
            wire.OOD_STD: [float(v) for v in reference["std"]],
        }
        stage2 = _ask(grid, plan, arrays, cfg2, site_of)
        shares = {
            s: m[wire.OOD_EXCEED] for s, m in stage2.items() if wire.OOD_EXCEED in m
        }
        counts = {s: int(stage2[s][wire.NUM_VAL_CASES]) for s in shares}
        if shares:
            reference.update(choose_threshold(shares, counts))
            out[OOD_KEY] = reference
            log.info(
                "out-of-distribution threshold %.2f (%.1f%% of %d validation "
                "patients above it)",
                reference["threshold"],
                100 * reference["false-alarm-rate"],
                reference["calibrated-on"],
            )
    else:
        log.warning(
            "no site shared OOD reference sums (privacy.share_fingerprint); "
            "predict will have no calibrated 'unlike the training data' score"
        )
    atomic_write_json(run_dir / CLINICAL_FILE, out)
    return {
        k: out[k] for k in (POSTPROCESS_KEY, OOD_KEY, TRAINING_DATA_KEY) if k in out
    }
