"""Bytes on the wire per round per site, against the model's float32 size.

A round moves, per site: the ``train`` message (global model + config) down,
the site's reply (its model + aggregate metrics) up, and the ``evaluate``
message (global model) down with a small metrics reply up. Flower 1.41 sends a
message as a tree of content-addressed objects (message, records, arrays, array
chunks), each serialised with the object's own ``deflate()``; identical chunks
are sent once. This script builds the messages exactly as kidneyfl's ServerApp
and ClientApp do (the model packed into one buffer plus its layout,
``common.wire.pack_arrays``) and sums the serialised objects, so the figure is
what Flower puts on the wire before HTTP/TLS framing; the per-tensor arrays
Flower would send unpacked are shown beside it. kidneyfl offers no update
compression, so there is no compressed column (and no Dice cost to report).

    .venv/bin/python benchmarks/wire_bytes.py [--models unet-tiny,unet-small]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def wire_bytes(msg) -> int:  # noqa: ANN001
    """Serialised size of every distinct object of a Flower message."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


def measure(model_name: str) -> dict:
    """Per-site bytes of one round for a registered model, packed as sent."""
    from common import wire

    row = measure_as(model_name, wire.pack_arrays)
    named = measure_as(model_name, lambda rec: rec)
    row["named_train_up"] = named["train_up"]
    row["named_update_over_raw"] = named["update_over_raw"]
    return row


def measure_as(model_name: str, encode) -> dict:  # noqa: ANN001
    """Per-site bytes of one round with the model's arrays ``encode``d."""
    from flwr.app import (
        ArrayRecord,
        ConfigRecord,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.supercore.task_identity import TaskIdentity

    from common import wire
    from common.models import build_model
    from common.weights import export_state

    for attr in ("_run_id", "_task_id", "_node_id"):
        setattr(TaskIdentity, attr, 1)
    model = build_model(model_name)
    state = export_state(model)
    raw = sum(t.numel() * 4 for t in state.values())  # float32 size
    config = ConfigRecord({wire.RUN_ID: "bench", wire.GLOBAL_ROUND: 1})
    sent = encode(ArrayRecord(state))
    down = Message(
        content=RecordDict({wire.ARRAYS: sent, wire.CONFIG: config}),
        message_type=MessageType.TRAIN,
        dst_node_id=2,
    )
    metrics = MetricRecord(
        {
            wire.NUM_EXAMPLES: 160,
            wire.TRAIN_LOSS: 0.5,
            wire.EPSILON: 3.2,
            wire.DELTA: 1e-3,
            wire.NOISE_MULTIPLIER: 0.9,
            wire.DP_ENABLED: 1,
            wire.REFUSED: 0,
        }
    )
    site = ConfigRecord({wire.SITE_NAME: "hospital-a"})
    up = Message(
        content=RecordDict({wire.ARRAYS: sent, wire.METRICS: metrics, wire.SITE: site}),
        reply_to=down,
    )
    eval_down = Message(
        content=RecordDict({wire.ARRAYS: sent, wire.CONFIG: config}),
        message_type=MessageType.EVALUATE,
        dst_node_id=2,
    )
    eval_up = Message(
        content=RecordDict(
            {
                wire.METRICS: MetricRecord(
                    {wire.NUM_VAL_CASES: 40, "dice-kidney": 0.6, wire.EVAL_LOSS: 0.4}
                ),
                wire.SITE: site,
            }
        ),
        reply_to=eval_down,
    )
    sizes = {
        "train_down": wire_bytes(down),
        "train_up": wire_bytes(up),
        "evaluate_down": wire_bytes(eval_down),
        "evaluate_up": wire_bytes(eval_up),
    }
    return {
        "model": model_name,
        "params": sum(t.numel() for t in state.values()),
        "float32_bytes": raw,
        **sizes,
        "update_over_raw": sizes["train_up"] / raw,
        "round_total_bytes": sum(sizes.values()),
        "round_over_3x_raw": sum(sizes.values()) / (3 * raw),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="unet-tiny,unet-small,unet")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = [measure(m) for m in args.models.split(",") if m]
    print(
        f"{'model':<16}{'params':>10}{'float32 MB':>12}{'update MB':>11}"
        f"{'update/raw':>12}{'round MB':>10}{'round/(3x raw)':>16}"
        f"{'unpacked/raw':>14}"
    )
    for r in rows:
        print(
            f"{r['model']:<16}{r['params']:>10,}{r['float32_bytes'] / 1e6:>12.3f}"
            f"{r['train_up'] / 1e6:>11.3f}{r['update_over_raw']:>12.4f}"
            f"{r['round_total_bytes'] / 1e6:>10.3f}{r['round_over_3x_raw']:>16.4f}"
            f"{r['named_update_over_raw']:>14.4f}"
        )
    print("compression: none offered (updates travel as raw float32, packed)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
