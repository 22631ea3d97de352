"""A model travels packed: one buffer and a layout instead of ~60 arrays."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from common import packing, wire
from common.models import build_model
from server.strategy.updates import check_update


@pytest.mark.parametrize("name", ["unet-tiny", "resnet-tiny"])
def test_pack_round_trip_is_exact_in_order_and_dtype(name):
    state = build_model(name).state_dict()
    packed = packing.pack_arrays(ArrayRecord(state))
    assert packing.is_packed(packed) and len(packed) == 2
    assert packing.pack_arrays(packed) is packed  # packing twice is a no-op
    back = packing.unpack_arrays(packed).to_torch_state_dict()
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    plain = ArrayRecord(state)
    assert packing.unpack_arrays(plain) is plain  # not packed: as is


def test_packing_cuts_the_objects_flower_sends_one_by_one():
    state = build_model("unet-tiny").state_dict()

    def objects(record):  # what Flower pushes and pulls, one request each
        return len(get_all_nested_objects(record))

    named, packed = (
        objects(ArrayRecord(state)),
        objects(packing.pack_arrays(ArrayRecord(state))),
    )
    assert named > len(state) and packed <= 6, (named, packed)
    raw = sum(v.numel() * v.element_size() for v in state.values())
    nbytes = sum(len(a.data) for a in packing.pack_arrays(ArrayRecord(state)).values())
    assert nbytes < 1.05 * raw  # one header, and the layout, for the whole model


def _packed(layout, blob):
    meta = np.frombuffer(json.dumps(layout).encode(), np.uint8).copy()
    return ArrayRecord(
        {packing.PACKED: Array(blob), packing.PACKED_LAYOUT: Array(meta)}
    )


@pytest.mark.parametrize(
    "layout, nbytes, problem",
    [
        ([["w", "<f4", [2]]], 4, "buffer ends inside array 'w'"),
        ([["w", "<f4", [2]]], 12, "4 bytes after the last array"),
        ([["w", "|O", [1]]], 8, "bad layout entry"),
        ([["w", "<f4", [-1]]], 4, "bad layout entry"),
        ([["w", "<f4", [1]], ["w", "<f4", [1]]], 8, "appears twice"),
        ({"w": 1}, 4, "not a list"),
        ([["w", "<f4"]], 4, "bad layout entry"),
    ],
)
def test_malformed_pack_is_refused_with_the_reason(layout, nbytes, problem):
    with pytest.raises(packing.PackError, match=problem):
        packing.unpack_arrays(_packed(layout, np.zeros(nbytes, np.uint8)))


def test_unreadable_layout_is_a_pack_error():
    rec = ArrayRecord(
        {
            packing.PACKED: Array(np.zeros(4, np.uint8)),
            packing.PACKED_LAYOUT: Array(np.frombuffer(b"\xff{", np.uint8).copy()),
        }
    )
    with pytest.raises(packing.PackError, match="unreadable"):
        packing.unpack_arrays(rec)


def _reply(record, node=7):
    msg = SimpleNamespace(
        has_content=lambda: True,
        content=RecordDict({wire.ARRAYS: record, wire.CONFIG: ConfigRecord({})}),
        metadata=SimpleNamespace(src_node_id=node),
    )
    return msg


def test_grid_packs_once_and_unpacks_replies_and_a_bad_one_is_rejected(caplog):
    state = build_model("unet-tiny").state_dict()
    glob = ArrayRecord(state)
    out = [_reply(glob, 1), _reply(glob, 2)]
    packing.pack_models(out)
    sent = [m.content[wire.ARRAYS] for m in out]
    assert sent[0] is sent[1] and packing.is_packed(sent[0])  # packed once for all

    good = _reply(packing.pack_arrays(ArrayRecord(state)), 1)
    bad_rec = packing.pack_arrays(ArrayRecord(state))
    bad_rec[packing.PACKED] = Array(np.zeros(5, np.uint8))
    bad = _reply(bad_rec, 2)
    with caplog.at_level(logging.WARNING, logger="kidneyfl.wire"):
        packing.unpack_models([good, bad])
    assert list(good.content[wire.ARRAYS].keys()) == list(state)
    assert check_update(glob, good.content[wire.ARRAYS]) is None
    # The bad one stays as it came, is logged with its node, and the update
    # guard refuses it: one bad site does not stop the round.
    assert packing.is_packed(bad.content[wire.ARRAYS])
    assert "node 2" in caplog.text and "buffer ends inside" in caplog.text
    assert check_update(glob, bad.content[wire.ARRAYS]) is not None
