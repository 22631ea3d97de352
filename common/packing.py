"""Models on the wire: a model's arrays packed into one buffer, and read back
without copies.

Flower sends every Array of an ArrayRecord as its own object, each a request
per hop, with its own npy header; :func:`pack_arrays` sends a model as two
arrays instead (the tensors' bytes back to back and a JSON layout), losslessly.
Both ends unpack before anything else reads the arrays
(docs/architecture.md). The record keys of the messages are
:mod:`common.wire`'s.
"""

import functools
import io
import json
import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:  # common/ stays importable without Flower
    from flwr.app import Array, ArrayRecord

log = logging.getLogger("kidneyfl.wire")

# Flower's Array serialises with np.save; this is its ``stype`` for that.
NUMPY_STYPE: Final = "numpy.ndarray"


def array_view(arr: "Array") -> np.ndarray:
    """A read-only view of an Array's values on its own bytes, without copying.

    Flower's ``Array.numpy()`` copies the whole buffer (``np.load``); the
    coordinator reads every update several times, so it reads views instead.
    The values, dtype and shape are exactly those of ``arr.numpy()``.

    Raises
    ------
    ValueError
        If the array holds Python objects (``np.load`` refuses them too), or its
        bytes are not an npy file.
    """
    if arr.stype != NUMPY_STYPE:
        return arr.numpy()  # Flower's own error for what it cannot decode
    data = arr.data
    # magic (6 bytes), version (2), header length (2 bytes in 1.0, 4 after)
    width = 2 if data[6:7] == b"\x01" else 4
    end = 8 + width + int.from_bytes(data[8 : 8 + width], "little")
    parsed = _npy_header(data[:end])
    if parsed is None:  # 3.0 (UTF-8 field names) and later: numpy's own path
        copy = arr.numpy()
        copy.flags.writeable = False
        return copy
    shape, fortran, dtype = parsed
    count = math.prod(shape)
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
    view = flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)
    view.flags.writeable = False
    return view


@functools.lru_cache(maxsize=4096)
def _npy_header(
    header: bytes,
) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    # Parsing costs ~80 us (numpy evaluates the header's dict literal); every
    # site sends the same headers, so each distinct one is parsed once.
    fp = io.BytesIO(header)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        return None
    if dtype.hasobject:
        raise ValueError("array holds Python objects; refusing to load it")
    return tuple(shape), bool(fortran), dtype


# -- packing: a model's arrays as one buffer on the wire ---------------------------
# Flower sends every Array of an ArrayRecord as its own object, each a request
# per hop (coordinator -> SuperLink -> SuperNode -> ClientApp and back), with
# its own npy header. A U-Net has ~60 tensors, most of them tiny, so a model
# travels as two arrays instead: the raw bytes of every tensor back to back,
# and a JSON layout (name, dtype, shape per tensor, in order). Packing is
# lossless; both ends unpack before anything else reads the arrays.
PACKED: Final = "kidneyfl.packed"
PACKED_LAYOUT: Final = "kidneyfl.layout"
_PACKABLE_KINDS: Final = frozenset("fiub")  # numbers and bools, never objects


class PackError(ValueError):
    """A packed model that does not unpack (malformed or inconsistent)."""


def is_packed(record: "ArrayRecord") -> bool:
    """Whether ``record`` is a packed model (exactly the two packing keys)."""
    return set(record.keys()) == {PACKED, PACKED_LAYOUT}


def pack_arrays(record: "ArrayRecord") -> "ArrayRecord":
    """``record`` as one byte buffer and its layout (already packed: as is)."""

    from flwr.app import Array, ArrayRecord

    if is_packed(record):
        return record
    layout, parts = [], []
    for name, arr in record.items():
        view = np.ascontiguousarray(array_view(arr))
        layout.append([name, view.dtype.str, list(view.shape)])
        parts.append(view.reshape(-1).view(np.uint8))
    blob = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    meta = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8)
    return ArrayRecord({PACKED: Array(blob), PACKED_LAYOUT: Array(meta.copy())})


def unpack_arrays(record: "ArrayRecord") -> "ArrayRecord":
    """The named arrays of a packed ``record`` (not packed: as is).

    Raises
    ------
    PackError
        If the layout is not a list of (name, numeric dtype, shape), names
        repeat, or the sizes do not add up to the buffer exactly.
    """

    from flwr.app import Array, ArrayRecord

    if not is_packed(record):
        return record
    try:
        blob = array_view(record[PACKED])
        raw = array_view(record[PACKED_LAYOUT])
        if blob.dtype != np.uint8 or blob.ndim != 1 or raw.dtype != np.uint8:
            raise PackError("packed model: buffer and layout must be uint8 bytes")
        layout = json.loads(raw.tobytes().decode())
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, PackError):
            raise
        raise PackError(f"packed model: unreadable buffer or layout ({exc})") from exc
    if not isinstance(layout, list):
        raise PackError("packed model: the layout is not a list")
    out: dict[str, Array] = {}
    offset = 0
    for entry in layout:
        try:
            name, dtype_str, shape = entry
            dtype = np.dtype(dtype_str)
            ok = isinstance(name, str) and isinstance(shape, list)
            ok = ok and all(isinstance(d, int) and d >= 0 for d in shape)
        except (TypeError, ValueError):
            ok = False
        if not ok or dtype.kind not in _PACKABLE_KINDS or dtype.itemsize > 16:
            raise PackError(f"packed model: bad layout entry {str(entry)[:80]}")
        if name in out:
            raise PackError(f"packed model: array {name!r} appears twice")
        size = math.prod(shape) * dtype.itemsize
        if offset + size > blob.size:
            raise PackError(f"packed model: buffer ends inside array {name!r}")
        try:  # e.g. a shape of [0, 10**30]: no bytes, but no numpy array either
            chunk = blob[offset : offset + size].view(dtype).reshape(shape)
        except (ValueError, TypeError, OverflowError) as exc:
            raise PackError(f"packed model: array {name!r} cannot be shaped") from exc
        out[name] = Array(np.array(chunk))
        offset += size
    if offset != blob.size:
        raise PackError(
            f"packed model: {blob.size - offset} bytes after the last array"
        )
    return ArrayRecord(out)


def _array_records(msg: Any) -> dict[str, Any]:
    """A message's array records (none for errors and stand-in messages)."""
    if not hasattr(msg, "has_content") or not msg.has_content():
        return {}
    return dict(msg.content.array_records)


def pack_models(messages: Iterable[Any]) -> list[Any]:
    """The messages with every model packed (:func:`pack_arrays`), in place.

    A model sent to many sites is packed once.
    """
    out, packed = list(messages), {}
    for msg in out:
        for name, rec in _array_records(msg).items():
            if id(rec) not in packed:
                packed[id(rec)] = (rec, pack_arrays(rec))  # keeps rec alive
            msg.content[name] = packed[id(rec)][1]
    return out


def unpack_models(replies: Iterable[Any]) -> list[Any]:
    """The replies with every packed model unpacked, in place.

    A model that does not unpack is left as it came and logged; the update
    guard then rejects it (its arrays are not the model's), so one bad site
    never stops the round.
    """
    out = list(replies)
    for msg in out:
        for name, rec in _array_records(msg).items():
            try:
                msg.content[name] = unpack_arrays(rec)
            except PackError as exc:
                log.warning("node %s: %s", msg.metadata.src_node_id, exc)
            except Exception as exc:  # noqa: BLE001 - one reply never ends a run
                log.warning(
                    "node %s: packed model unreadable (%s)",
                    msg.metadata.src_node_id,
                    type(exc).__name__,
                )
    return out
