"""Sites' replies on the coordinator: read without copies, and handed on to
Flower's strategies as the weight cap and the wire contract require."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from common import wire
from server.strategy.influence import capped_shares

__all__ = ["cast_like", "for_inner", "metrics_of", "part", "records_of"]

_R = TypeVar("_R", ArrayRecord, MetricRecord, ConfigRecord)


def part(msg: Message, name: str, kind: type[_R]) -> _R | None:
    """``msg.content.<kind>_records.get(name)`` without Flower building (and
    writing back) a filtered copy of the whole RecordDict at every access."""
    record = msg.content.get(name)
    return record if isinstance(record, kind) else None


def records_of(content: RecordDict, kind: type[_R]) -> Iterator[_R]:
    """The records of one kind, in order (``content.<kind>_records.values()``)."""
    return (r for r in content.values() if isinstance(r, kind))


def metrics_of(msg: Message) -> dict[str, float]:
    """The reply's numeric metrics (``{}`` without a metric record)."""
    record = part(msg, wire.METRICS, MetricRecord)
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}


def cast_like(reference: ArrayRecord, arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` in the dtypes of ``reference`` (as is when they match)."""
    # Some of Flower's server optimisers compute in float64; the global model
    # keeps the sites' dtypes so that every round's guard compares like with like.
    if all(arrays[k].dtype == reference[k].dtype for k in reference.keys()):
        return arrays
    return ArrayRecord(
        {
            k: Array(
                np.asarray(
                    wire.array_view(arrays[k]),
                    dtype=wire.array_view(reference[k]).dtype,
                )
            )
            for k in reference.keys()
        }
    )


def for_inner(
    msgs: list[Message], cap: float, weighted: bool
) -> tuple[list[Message], list[float]]:
    """The replies as a Flower strategy is to see them, and each one's share of
    a case-weighted aggregate (empty unless ``weighted``).

    The replies themselves, unless the cap lowers a share or their metric
    records differ in keys (Flower refuses to aggregate those, and a site under
    DP sends no train-loss). Then copies that share the arrays, with a metric
    record of the keys every reply carries and, under the cap, the capped share
    as ``num-examples``: any Flower strategy that weights by ``num-examples``
    then weights by the capped shares.

    Parameters
    ----------
    msgs : list of Message
        Train replies, each with a metric record holding a positive finite
        ``num-examples``.
    cap : float
        ``max-site-weight``.
    weighted : bool
        Whether the strategy weights by ``num-examples`` at all.
    """
    if not msgs:
        return msgs, []
    records = [cast(MetricRecord, part(m, wire.METRICS, MetricRecord)) for m in msgs]
    weights = [float(cast(float, r[wire.NUM_EXAMPLES])) for r in records]
    total = sum(weights)
    shares = capped_shares(weights, cap) if weighted else []
    capped = any(s != w / total for s, w in zip(shares, weights, strict=False))
    common = set.intersection(*(set(r.keys()) for r in records))
    if not capped and all(len(r) == len(common) for r in records):
        return msgs, shares
    out = []
    for k, (msg, record) in enumerate(zip(msgs, records, strict=True)):
        metrics = MetricRecord({key: record[key] for key in record if key in common})
        if capped:
            metrics[wire.NUM_EXAMPLES] = shares[k]
        content = RecordDict(
            {
                name: metrics if name == wire.METRICS else rec
                for name, rec in msg.content.items()
            }
        )
        out.append(make_message(msg.metadata, content=content))
    return out, shares
