"""Bytes on the wire per round per site, against the model's float32 size.

A round moves, per site: the ``train`` message (global model + config) down,
the site's reply (its model + aggregate metrics) up, and the ``evaluate``
message (global model) down with a small metrics reply up. Flower 1.41 sends a
message as a tree of content-addressed objects (message, records, arrays, array
chunks), each serialised with the object's own ``deflate()``; identical chunks
are sent once. This script builds the messages exactly as kidneyfl's ServerApp
and ClientApp do (the model packed into one buffer plus its layout,
``common.packing.pack_arrays``) and sums the serialised objects, so the figure is
what Flower puts on the wire before HTTP/TLS framing; the per-tensor arrays
Flower would send unpacked are shown beside it. kidneyfl offers no update
compression, so there is no compressed column (and no Dice cost to report).

    .venv/bin/python benchmarks/wire_bytes.py [--models unet-tiny,unet-small]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from harness import Column, names, parser, set_task_identity, table, write_json

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Message

COLUMNS = [
    Column("model", "model", width=16, align="<"),
    Column("params", "params", ",", 10),
    Column("float32 MB", "float32_bytes", ".3f", 12, scale=1e6),
    Column("update MB", "train_up", ".3f", 11, scale=1e6),
    Column("update/raw", "update_over_raw", ".4f", 12),
    Column("round MB", "round_total_bytes", ".3f", 10, scale=1e6),
    Column("round/(3x raw)", "round_over_3x_raw", ".4f", 16),
    Column("unpacked/raw", "named_update_over_raw", ".4f", 14),
]


def wire_bytes(msg: Message) -> int:
    """Serialised size of every distinct object of a Flower message."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


def measure(model_name: str) -> dict:
    """Per-site bytes of one round for a registered model, packed as sent."""
    from common import packing

    row = measure_as(model_name, packing.pack_arrays)
    named = measure_as(model_name, lambda rec: rec)
    row["named_train_up"] = named["train_up"]
    row["named_update_over_raw"] = named["update_over_raw"]
    return row


def round_messages(sent: object) -> dict[str, Message]:
    """One round's four messages of a site, each carrying the model ``sent``
    where kidneyfl's apps put it (train down and up, evaluate down)."""
    from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from common import wire

    config = ConfigRecord({wire.RUN_ID: "bench", wire.GLOBAL_ROUND: 1})
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
    eval_metrics = {wire.NUM_VAL_CASES: 40, "dice-kidney": 0.6, wire.EVAL_LOSS: 0.4}
    eval_up = Message(
        content=RecordDict({wire.METRICS: MetricRecord(eval_metrics), wire.SITE: site}),
        reply_to=eval_down,
    )
    return {
        "train_down": down,
        "train_up": up,
        "evaluate_down": eval_down,
        "evaluate_up": eval_up,
    }


def measure_as(model_name: str, encode: Callable[[ArrayRecord], object]) -> dict:
    """Per-site bytes of one round with the model's arrays ``encode``d."""
    from flwr.app import ArrayRecord

    from common.models import build_model
    from common.weights import export_state

    set_task_identity()
    state = export_state(build_model(model_name))
    raw = sum(t.numel() * 4 for t in state.values())  # float32 size
    messages = round_messages(encode(ArrayRecord(state)))
    sizes = {kind: wire_bytes(msg) for kind, msg in messages.items()}
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
    ap = parser(__doc__)
    ap.add_argument("--models", type=names, default="unet-tiny,unet-small,unet")
    args = ap.parse_args(argv)
    rows = [measure(m) for m in args.models]
    print(table(rows, COLUMNS))
    print("compression: none offered (updates travel as raw float32, packed)")
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
