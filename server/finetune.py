"""Per-site fine-tuning of the final global model (a last, unaggregated round).

After the federated rounds, every site is sent the final global model in a
``train.finetune`` message. It trains a set number of local steps (DP-SGD,
accounted in its ledger like any round), keeps the fine-tuned model in its
``state_dir``, and answers with that model's validation metrics only. Nothing
is aggregated; the coordinator writes the per-site results to
``fine-tune.json`` beside the run. Every reply is read as every round's are
(``server/strategy/reply_filter.py``): one that breaks the wire contract is
listed under ``rejected`` with the reason, and the others are kept. Like
server/strategy/wrapper.py this module talks Flower's Message API, because it
sends one round of its own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import wire
from common.atomic import atomic_write_json
from common.config import Plan
from common.contract import ReplyRules
from server.strategy.reply_filter import Intake, sort_replies

log = logging.getLogger("kidneyfl.server")

FINE_TUNE_FILE = "fine-tune.json"


def model_messages(
    node_ids: list[int], arrays: ArrayRecord, config: dict[str, Any], kind: str
) -> list[Message]:
    """One ``kind`` message per site, carrying a model and a config record (the
    extra rounds after the federation: fine-tune, clinical calibration)."""
    record = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(config)})
    return [
        Message(content=record, message_type=kind, dst_node_id=node)
        for node in node_ids
    ]


def fine_tune_messages(
    node_ids: list[int], arrays: ArrayRecord, config: dict[str, Any]
) -> list[Message]:
    """One ``train.finetune`` message per site, carrying the final model."""
    kind = f"{MessageType.TRAIN}.{wire.FINE_TUNE_ACTION}"
    return model_messages(node_ids, arrays, config, kind)


def collect_fine_tune(
    replies: list[Message],
    site_of: Callable[[Message], str],
    rules: ReplyRules | None = None,
) -> dict[str, Any]:
    """Per-site metrics, refusals, rejections and failures of the fine-tune
    round; ``rules`` are the plan's (:meth:`ReplyRules.from_plan`)."""
    intake = Intake(
        f"{MessageType.TRAIN}.{wire.FINE_TUNE_ACTION}", rules or ReplyRules()
    )
    result = sort_replies(replies, site_of, intake)
    return {
        "sites": {site: metrics for site, _, metrics in result.accepted},
        "refused": result.refused,
        "rejected": result.rejected,
        "failed": result.failed,
    }


def run_fine_tune(
    grid: Grid,
    plan: Plan,
    run_dir: Path,
    arrays: ArrayRecord,
    base_config: dict[str, Any],
    site_of: Callable[[Message], str],
) -> dict[str, Any]:
    """Send the fine-tune round, wait for the replies, write ``fine-tune.json``."""
    round_ = plan.num_server_rounds + 1  # its own entry in the sites' ledgers
    config = {
        **base_config,
        wire.GLOBAL_ROUND: round_,
        wire.FINE_TUNE_STEPS: plan.fine_tune_steps,
    }
    messages = fine_tune_messages(list(grid.get_node_ids()), arrays, config)
    replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout))
    result = collect_fine_tune(replies, site_of, ReplyRules.from_plan(plan))
    result.update(steps=plan.fine_tune_steps, after_round=plan.num_server_rounds)
    atomic_write_json(run_dir / FINE_TUNE_FILE, _finite(result))
    for site, m in sorted(result["sites"].items()):
        log.info(
            "fine-tuned %s (%d steps): %s",
            site,
            plan.fine_tune_steps,
            ", ".join(
                f"{k} {v:.3f}" for k, v in sorted(m.items()) if k.startswith("dice-")
            ),
        )
    not_run = {**result["refused"], **result["rejected"], **result["failed"]}
    for site, why in not_run.items():
        log.warning("fine-tune at %s did not run: %s", site, why)
    return result


def _finite(obj: Any) -> Any:
    # JSON has no Infinity/NaN: a site without DP has epsilon = inf -> null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj
