"""Per-site fine-tuning of the final global model (a last, unaggregated round).

After the federated rounds, every site is sent the final global model in a
``train.finetune`` message. It trains a set number of local steps (DP-SGD,
accounted in its ledger like any round), keeps the fine-tuned model in its
``state_dir``, and answers with that model's validation metrics only. Nothing
is aggregated; the coordinator writes the per-site results to
``fine-tune.json`` beside the run. Like server/strategy/wrapper.py this module talks
Flower's Message API, because it sends one round of its own.
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

log = logging.getLogger("kidneyfl.server")

FINE_TUNE_FILE = "fine-tune.json"


def fine_tune_messages(
    node_ids: list[int], arrays: ArrayRecord, config: dict[str, Any]
) -> list[Message]:
    """One ``train.finetune`` message per site, carrying the final model."""
    record = RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord(config)})
    return [
        Message(
            content=record,
            message_type=f"{MessageType.TRAIN}.{wire.FINE_TUNE_ACTION}",
            dst_node_id=node,
        )
        for node in node_ids
    ]


def collect_fine_tune(
    replies: list[Message], site_of: Callable[[Message], str]
) -> dict[str, Any]:
    """Per-site metrics, refusals and failures of the fine-tune round."""
    out: dict[str, Any] = {"sites": {}, "refused": {}, "failed": {}}
    for msg in replies:
        site = site_of(msg)
        if msg.has_error():
            out["failed"][site] = str(msg.error.reason)[:500]
            continue
        metrics = msg.content.metric_records.get(wire.METRICS)
        values = {
            k: float(v)
            for k, v in (metrics or {}).items()
            if isinstance(v, int | float)
        }
        if values.get(wire.REFUSED, 0):
            reason = msg.content.config_records.get(wire.SITE, {})
            out["refused"][site] = str(reason.get(wire.REFUSAL_REASON, "refused"))
        else:
            out["sites"][site] = values
    return out


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
    result = collect_fine_tune(replies, site_of)
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
    for site, why in {**result["refused"], **result["failed"]}.items():
        log.warning("fine-tune at %s did not run: %s", site, why)
    return result


def _finite(obj: Any) -> Any:
    # JSON has no Infinity/NaN: a site without DP has epsilon = inf -> null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj
