"""Site updates on the coordinator: read once, checked, and averaged in one pass.

The update guard needs, for every reply, its keys, shapes and dtypes (from the
arrays' metadata), whether it holds NaN or Inf, and the L2 norm of
``update - global``; FedAvg and FedProx then need the case-weighted mean. Each
update is read on its own bytes (:func:`common.packing.array_view`, never a copy),
and the NaN/Inf check, the norm and the mean are computed together, chunk by
chunk, so that the round's arrays cross memory once. Chunks are small enough to
stay in the CPU cache while every site's slice of them is read.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from common import packing

__all__ = ["Scan", "check_update", "model_scale", "scan_updates", "update_norm"]

# Elements per chunk: the global model's slice, one site's slice and two scratch
# slices (4 x 1 MiB of float32) stay in the L2/L3 caches across all sites.
CHUNK = 1 << 18

Views = dict[str, np.ndarray]


@dataclass
class Scan:
    """What the guard found in one update."""

    problem: str | None  # why it may not be aggregated; None if it may
    sq_norm: float  # squared L2 norm of update - global over floating arrays

    @property
    def norm(self) -> float:
        """L2 norm of ``update - global``."""
        return math.sqrt(self.sq_norm)


def views(record: ArrayRecord) -> Views:
    """Zero-copy, read-only views of every array of a record, in its key order."""
    return {k: packing.array_view(record[k]) for k in record.keys()}


class _NpyWriter:
    """One array's npy bytes (as ``np.save`` writes them), filled chunk by chunk.

    The buffer is sized once and handed to the Array without a copy
    (``BytesIO.getvalue`` shares it), so the mean touches fresh memory once:
    ``Array(ndarray)`` would copy it into a new buffer, then copy that again.
    """

    def __init__(self, dtype: np.dtype, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape = dtype, shape
        fmt = np.lib.format
        d = {"descr": fmt.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        header = io.BytesIO()
        try:
            fmt.write_array_header_1_0(header, d)
        except ValueError:  # header over 64 KiB: np.save moves to version 2.0
            header = io.BytesIO()
            fmt.write_array_header_2_0(header, d)
        self._out = io.BytesIO()
        size = header.tell() + dtype.itemsize * math.prod(shape)
        self._out.seek(size - 1)
        self._out.write(b"\0")  # one allocation of the final size
        self._out.seek(0)
        self._out.write(header.getvalue())

    def write(self, values: np.ndarray) -> None:
        """Append the next values (C order)."""
        self._out.write(values.data)

    def array(self) -> Array:
        """The finished Array (``Array(ndarray)``'s bytes, dtype and shape)."""
        data = self._out.getvalue()
        self._out.close()
        return Array(
            dtype=str(self.dtype),
            shape=self.shape,
            stype=packing.NUMPY_STYPE,
            data=data,
        )


def _floating(arr: np.ndarray) -> bool:
    return bool(np.issubdtype(arr.dtype, np.floating))


def _metadata_problem(
    reference: ArrayRecord, update: ArrayRecord | None
) -> tuple[str | None, int]:
    """Why the update's keys, shapes or dtypes are wrong, and at which key index
    (arrays before it are still checked for NaN/Inf, as a key-by-key check would)."""
    if update is None:
        return "reply carries no model arrays", 0
    ref_keys, got_keys = set(reference.keys()), set(update.keys())
    if ref_keys != got_keys:
        missing = sorted(ref_keys - got_keys)[:3]
        extra = sorted(got_keys - ref_keys)[:3]
        return (
            f"array keys differ from the global model (missing {missing}, "
            f"extra {extra})"
        ), 0
    for i, key in enumerate(reference.keys()):
        ref, got = reference[key], update[key]
        if tuple(ref.shape) != tuple(got.shape):
            return (
                f"array {key!r} has shape {tuple(got.shape)}, "
                f"expected {tuple(ref.shape)}"
            ), i
        if ref.dtype != got.dtype:
            return f"array {key!r} has dtype {got.dtype}, expected {ref.dtype}", i
    return None, len(reference)


def _decode(ref: Views, update: ArrayRecord, upto: int) -> tuple[Views, str | None]:
    """Views of the first ``upto`` arrays; the bytes must agree with the metadata."""
    out: Views = {}
    for key in list(ref)[:upto]:
        r = ref[key]
        try:
            u = packing.array_view(update[key])
        except (ValueError, EOFError, TypeError):
            return out, f"array {key!r} is not a readable numpy array"
        if u.shape != r.shape:
            return out, f"array {key!r} has shape {u.shape}, expected {r.shape}"
        if u.dtype != r.dtype:
            return out, f"array {key!r} has dtype {u.dtype}, expected {r.dtype}"
        out[key] = u
    return out, None


def _nan_inf(key: str) -> str:
    return f"array {key!r} has NaN or Inf values"


def _sq_diff(u: np.ndarray, r: np.ndarray, buf: np.ndarray) -> float | None:
    """Squared L2 norm of ``u - r`` (1-d, ``buf`` their size); None if ``u``
    holds NaN or Inf."""
    np.subtract(u, r, out=buf)
    sq = float(np.dot(buf, buf))
    if math.isfinite(sq):
        return sq
    # float32 squares overflow past |d| ~ 1.8e19, which is a huge update, not a
    # NaN: redo this chunk in float64, and look at the values only if that fails.
    d = u.astype(np.float64) - r
    sq = float(np.dot(d, d))
    if math.isfinite(sq) or np.isfinite(u).all():
        return sq
    return None


def _flat(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(-1)  # a view for the C-ordered arrays Flower sends


def _pass(
    ref: Views,
    updates: list[Views],
    factors: Sequence[float] | None,
) -> tuple[list[str | None], list[float], dict[str, Array] | None]:
    """One chunked pass over all updates: NaN/Inf, squared norms and, with
    ``factors``, the weighted mean ``sum_k f_k u_k`` as Arrays.

    The mean is computed as Flower's ``aggregate_arrayrecords`` does (in the
    arrays' dtype, sites in order), so FedAvg's numbers are unchanged; it is
    meaningless if any update turns out to hold NaN/Inf.
    """
    problems: list[str | None] = [None] * len(updates)
    sqs = [0.0] * len(updates)
    mean: dict[str, Array] | None = {} if factors and updates else None
    for key, r_view in ref.items():
        us = [u[key] for u in updates]
        if _floating(r_view):
            out = _NpyWriter(r_view.dtype, r_view.shape) if mean is not None else None
            _float_pass(key, r_view, us, factors, problems, sqs, out)
            if mean is not None and out is not None:
                mean[key] = out.array()
        elif mean is not None and factors is not None:
            # Flower's arithmetic exactly (int * float is float64)
            acc = us[0] * factors[0]
            for u, f in zip(us[1:], factors[1:], strict=True):
                acc += u * f
            mean[key] = Array(np.asarray(acc))
    return problems, sqs, mean


def _float_pass(
    key: str,
    r_view: np.ndarray,
    us: list[np.ndarray],
    factors: Sequence[float] | None,
    problems: list[str | None],
    sqs: list[float],
    out: _NpyWriter | None,
) -> None:
    """:func:`_pass` for one floating-point array; fills ``problems``, ``sqs``
    and ``out`` in place."""
    r, flat = _flat(r_view), [_flat(u) for u in us]
    n = min(CHUNK, r.size)
    buf, acc = np.empty(n, dtype=r.dtype), np.empty(n, dtype=r.dtype)
    for i in range(0, r.size, CHUNK):
        j = min(i + CHUNK, r.size)
        r_c, d, acc_c = r[i:j], buf[: j - i], acc[: j - i]
        first = True
        for k, u in enumerate(flat):
            if problems[k] is not None:
                continue
            u_c = u[i:j]
            sq = _sq_diff(u_c, r_c, d)
            if sq is None:
                problems[k] = _nan_inf(key)
                continue
            sqs[k] += sq
            if out is None or factors is None:
                continue
            if first:
                np.multiply(u_c, factors[k], out=acc_c)
                first = False
            else:
                np.multiply(u_c, factors[k], out=d)
                acc_c += d
        if out is not None:
            out.write(acc_c)


def scan_updates(
    reference: ArrayRecord,
    updates: Sequence[ArrayRecord | None],
    factors: Sequence[float] | None = None,
) -> tuple[list[Scan], dict[str, Array] | None]:
    """The guard's findings for each update and, with ``factors`` (one weight
    per update, summing to 1), their weighted mean by key.

    The mean is None unless every update passed (then it is Flower's FedAvg
    mean of all of them); the caller averages again over those that did.
    """
    ref = views(reference)
    problems: list[str | None] = [None] * len(updates)
    decoded: dict[int, Views] = {}
    for k, update in enumerate(updates):
        problem, upto = _metadata_problem(reference, update)
        if update is not None:
            got, bad = _decode(ref, update, upto)
            problem = bad or problem
            if problem is None:
                decoded[k] = got
            else:  # a key-by-key check reports NaN/Inf in an earlier array first
                for key, arr in got.items():
                    if _floating(arr) and not np.isfinite(arr).all():
                        problem = _nan_inf(key)
                        break
        problems[k] = problem
    order = sorted(decoded)
    use = factors if factors is not None and len(order) == len(updates) else None
    found, sqs, mean = _pass(
        ref,
        [decoded[k] for k in order],
        [use[k] for k in order] if use is not None else None,
    )
    scans = [Scan(p, math.nan) for p in problems]
    for k, problem, sq in zip(order, found, sqs, strict=True):
        scans[k] = Scan(problem, sq if problem is None else math.nan)
    if mean is not None and any(s.problem for s in scans):
        mean = None
    return scans, mean


def check_update(reference: ArrayRecord, update: ArrayRecord | None) -> str | None:
    """Why an update may not be aggregated, or None if it may.

    The reference is the global model the site was sent.
    """
    return scan_updates(reference, [update])[0][0].problem


def update_norm(reference: ArrayRecord, update: ArrayRecord) -> float:
    """L2 norm of ``update - reference`` over all floating-point arrays."""
    total = 0.0
    for key in reference.keys():
        r = _flat(packing.array_view(reference[key]))
        if not _floating(r):
            continue
        u = _flat(packing.array_view(update[key]))
        buf = np.empty(min(CHUNK, r.size), dtype=r.dtype)
        for i in range(0, r.size, CHUNK):
            j = min(i + CHUNK, r.size)
            sq = _sq_diff(u[i:j], r[i:j], buf[: j - i])
            total += math.nan if sq is None else sq
    return math.sqrt(total)


def model_scale(record: ArrayRecord) -> tuple[float, float]:
    """L2 norm of a model's floating-point arrays, and the largest machine
    epsilon among their dtypes: the size of rounding in any mean of models."""
    sq, eps = 0.0, 0.0
    for view in views(record).values():
        if _floating(view):
            flat = _flat(view)
            for i in range(0, flat.size, CHUNK):  # float64, a chunk at a time
                chunk = flat[i : i + CHUNK].astype(np.float64)
                sq += float(np.dot(chunk, chunk))
            eps = max(eps, float(np.finfo(view.dtype).eps))
    return math.sqrt(sq), eps
