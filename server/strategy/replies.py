"""Sites' replies on the coordinator: seen as the wire contract sees them, read
without copies, and handed on to Flower's strategies as the weight cap and the
wire contract require."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TypeVar, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from common import packing, wire
from common.contract import ArraySpec, ReplyView
from server.strategy.influence import capped_shares

__all__ = [
    "cast_like",
    "for_inner",
    "metrics_of",
    "part",
    "received_view",
    "records_of",
]

# The most elements one array of a reply may claim: far above any model here,
# far below what numpy's shape arithmetic overflows on.
MAX_ELEMENTS = 1 << 40
_KINDS = ((ArrayRecord, "arrays"), (MetricRecord, "metrics"), (ConfigRecord, "config"))

_R = TypeVar("_R", ArrayRecord, MetricRecord, ConfigRecord)


def part(msg: Message, name: str, kind: type[_R]) -> _R | None:
    """``msg.content.<kind>_records.get(name)`` without Flower building (and
    writing back) a filtered copy of the whole RecordDict at every access."""
    record = msg.content.get(name)
    return record if isinstance(record, kind) else None


def records_of(content: RecordDict, kind: type[_R]) -> Iterator[_R]:
    """The records of one kind, in order (``content.<kind>_records.values()``)."""
    return (r for r in content.values() if isinstance(r, kind))


def received_view(msg: Message, message_type: str) -> tuple[ReplyView, list[str]]:
    """What a reply carries, as the contract sees it, and what in its arrays
    cannot be read at all.

    ``message_type`` is what the coordinator asked for (a reply's own metadata
    is the site's to set). Every record is classified by its class, never by
    its name; anything but Flower's three record kinds is ``other``. Each
    array is decoded once (:func:`common.packing.array_view`, no copy): its
    storage type must be numpy's, its shape whole numbers whose product is
    bounded, and its bytes must hold exactly the shape and dtype its metadata
    claims. May raise on a malformed message; the caller's catch-all rejects it.
    """
    if msg.has_error():
        return ReplyView(message_type, {}, is_error=True), []
    records: dict[str, str] = {}
    problems: list[str] = []
    arrays: dict[str, ArraySpec] = {}
    for name, record in msg.content.items():
        kind = next((k for cls, k in _KINDS if isinstance(record, cls)), "other")
        records[str(name)] = kind
        if kind == "arrays":
            for key, arr in record.items():
                arrays[str(key)] = (tuple(arr.shape), str(arr.dtype))
                problems += _array_problem(str(key), arr)
    metrics = part(msg, wire.METRICS, MetricRecord)
    site = part(msg, wire.SITE, ConfigRecord)
    view = ReplyView(
        message_type,
        records,
        arrays,
        dict(metrics) if metrics is not None else {},
        dict(site) if site is not None else {},
    )
    return view, problems[:1]


def _array_problem(key: str, arr: Array) -> list[str]:
    """Why one array cannot be read as what its metadata says (empty: it can)."""
    name = repr(key[:64])
    if arr.stype != packing.NUMPY_STYPE:
        return [f"array {name} is not stored as a numpy array"]
    shape = arr.shape
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return [f"array {name} has a shape that is not whole numbers"]
    if (
        any(not 0 <= d <= MAX_ELEMENTS for d in shape)
        or math.prod(shape) > MAX_ELEMENTS
    ):
        return [f"array {name} has a negative or oversized shape"]
    try:
        view = packing.array_view(arr)
    except (ValueError, TypeError, EOFError, OverflowError):
        return [f"array {name}: its bytes are not a numpy array"]
    if view.shape != tuple(shape) or str(view.dtype) != str(arr.dtype):
        return [f"array {name}: its bytes do not hold its shape and dtype"]
    return []


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
                    packing.array_view(arrays[k]),
                    dtype=packing.array_view(reference[k]).dtype,
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
