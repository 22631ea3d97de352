"""The coordinator's one-pass path: zero-copy views of updates, the guard in one
pass, and FedAvg/FedProx's mean computed there, equal to Flower's own."""

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common import packing, wire
from server.strategy import updates
from server.strategy.aggregators import build_strategy
from server.strategy.updates import check_update, update_norm
from server.strategy.wrapper import SiteAwareStrategy
from tests.fakes import FiveNodeGrid, forbid_flower_mean, train_reply

pytestmark = pytest.mark.usefixtures("task_identity")

# -- array_view ------------------------------------------------------------------

_ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4)),
    np.arange(24, dtype=np.float32).reshape(4, 6).T,  # not contiguous: np.save copies
    np.array(3.5, dtype=np.float32),  # 0-d
    np.zeros((0, 5), dtype=np.float32),
    np.zeros((3, 0), dtype=np.int64, order="F"),
    np.array([True, False, True]),
    np.arange(-5, 5, dtype=np.int8),
    np.arange(6, dtype=np.int64).reshape(2, 3) * 10**12,
    np.array([1, 2, 3], dtype=">i4"),  # big-endian
    np.array([np.nan, np.inf, -0.0, 1e-40], dtype=np.float32),
    np.arange(10, dtype=np.float16),
    np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
    np.zeros((2,), dtype=[("a", "<i4"), ("b", "<f8")]),  # structured
]


@pytest.mark.parametrize("value", _ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_array_view_equals_flower_numpy_and_is_read_only(value):
    arr = Array(value)
    view, loaded = packing.array_view(arr), arr.numpy()
    assert view.dtype == loaded.dtype and view.shape == loaded.shape
    np.testing.assert_array_equal(view, loaded)
    assert view.tobytes(order="A") == loaded.tobytes(order="A")
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[...] = 0


def test_array_view_does_not_copy():
    arr = Array(np.random.default_rng(0).standard_normal(1000).astype(np.float32))
    view = packing.array_view(arr)
    assert np.shares_memory(view, np.frombuffer(arr.data, dtype=np.uint8))


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_array_view_reads_every_npy_version(version):
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, value, version=version)
    arr = Array(
        dtype="float32", shape=(3, 4), stype=packing.NUMPY_STYPE, data=buf.getvalue()
    )
    view = packing.array_view(arr)
    np.testing.assert_array_equal(view, value)
    assert not view.flags.writeable


def test_array_view_refuses_what_flower_cannot_decode():
    torch_like = Array(dtype="float32", shape=(1,), stype="torch.Tensor", data=b"x")
    with pytest.raises(TypeError):
        packing.array_view(torch_like)


# -- the fast FedAvg mean equals Flower's --------------------------------------------


def _state(seed: int, shapes=((300_001,), (7, 5), (3,), ())) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    out = {
        f"l{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)
    }
    out["steps"] = np.array(seed * 7 + 1, dtype=np.int64)  # e.g. num_batches_tracked
    return ArrayRecord({k: Array(v) for k, v in out.items()})


def _wrapper(name="fedavg", reference=None, norm_factor=0.0):
    s = SiteAwareStrategy(
        build_strategy(name, min_sites=1, fraction_evaluate=1.0),
        min_sites=1,
        round_offset=0,
        base_config={},
        on_round_end=lambda rec, arrays: None,
        norm_factor=norm_factor,
    )
    ref = reference if reference is not None else _state(100)
    list(s.configure_train(1, ref, ConfigRecord(), FiveNodeGrid()))
    return s


def _replies(states, cases):
    return [
        train_reply(i + 1, f"site-{i}", st, n)
        for i, (st, n) in enumerate(zip(states, cases, strict=True))
    ]


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_fast_mean_equals_flowers_fedavg(name, k, monkeypatch):
    states = [_state(seed) for seed in range(k)]
    cases = [3 * i + 1 for i in range(k)]
    replies = _replies(states, cases)
    s = _wrapper(name)
    forbid_flower_mean(monkeypatch, s)
    got, got_metrics = s.aggregate_train(1, replies)
    want, want_metrics = FedAvg(weighted_by_key=wire.NUM_EXAMPLES).aggregate_train(
        1, replies
    )
    assert list(got.keys()) == list(want.keys())
    for key in want.keys():
        w = want[key].numpy()
        if key == "steps":  # Flower's float mean, kept in the model's dtype
            w = w.astype(np.int64)
        g = got[key].numpy()
        assert g.dtype == w.dtype and g.shape == w.shape, key
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * np.abs(w).max())
    assert dict(got_metrics) == pytest.approx(dict(want_metrics))


def test_fast_mean_is_the_hand_computed_weighted_mean():
    states = [_state(seed) for seed in range(3)]
    cases = [1, 2, 5]
    s = _wrapper()
    got, _ = s.aggregate_train(1, _replies(states, cases))
    want = sum(
        st["l0"].numpy().astype(np.float64) * n
        for st, n in zip(states, cases, strict=True)
    )
    np.testing.assert_allclose(got["l0"].numpy(), want / 8, rtol=1e-5, atol=1e-6)


def test_other_strategies_still_aggregate_through_flower(monkeypatch):
    calls = []
    s = _wrapper("fedmedian")
    inner = s.inner.aggregate_train
    monkeypatch.setattr(
        s.inner, "aggregate_train", lambda *a: calls.append(1) or inner(*a)
    )
    arrays, _ = s.aggregate_train(1, _replies([_state(i) for i in range(3)], [1, 1, 1]))
    assert calls and arrays is not None


# -- the guard: same reasons, rejected updates never enter the mean -------------------


def _with(record: ArrayRecord, key: str, value: np.ndarray) -> ArrayRecord:
    return ArrayRecord(
        {k: Array(value) if k == key else record[k] for k in record.keys()}
    )


def _scaled(record: ArrayRecord, reference: ArrayRecord, factor: float):
    return ArrayRecord(
        {
            k: Array(
                np.asarray(
                    reference[k].numpy()
                    + (record[k].numpy() - reference[k].numpy()) * np.float32(factor)
                )
            )
            if k != "steps"
            else record[k]
            for k in record.keys()
        }
    )


def _bad_updates():
    ref, good = _state(100), _state(5)
    l0 = good["l0"].numpy().copy()
    nan, inf = l0.copy(), l0.copy()
    nan[123_456] = np.nan
    inf[-1] = -np.inf
    return (
        ref,
        good,
        {
            "nan": (_with(good, "l0", nan), "array 'l0' has NaN or Inf values"),
            "inf": (_with(good, "l0", inf), "array 'l0' has NaN or Inf values"),
            "shape": (
                _with(good, "l1", np.zeros((5, 7), np.float32)),
                "array 'l1' has shape (5, 7), expected (7, 5)",
            ),
            "dtype": (
                _with(good, "l2", np.zeros(3, np.float64)),
                "array 'l2' has dtype float64, expected float32",
            ),
            "missing": (
                ArrayRecord({k: good[k] for k in good.keys() if k != "l3"}),
                "array keys differ from the global model (missing ['l3'], extra [])",
            ),
            "scaled": (_scaled(good, ref, 100.0), "guard-norm-factor"),
        },
    )


@pytest.mark.parametrize("case", ["nan", "inf", "shape", "dtype", "missing", "scaled"])
def test_rejected_update_reason_and_mean_of_the_rest(case, monkeypatch):
    ref, _, bad = _bad_updates()
    update, reason = bad[case]
    goods = [_state(seed) for seed in (1, 2, 3)]
    cases = [2, 3, 4]
    s = _wrapper(reference=ref, norm_factor=10.0)
    forbid_flower_mean(monkeypatch, s)
    replies = _replies(goods, cases) + [train_reply(9, "bad", update, 50)]
    got, metrics = s.aggregate_train(1, replies)
    assert reason in s._current.rejected["bad"]
    assert set(s._current.train) == {"site-0", "site-1", "site-2"}
    want, want_metrics = FedAvg(weighted_by_key=wire.NUM_EXAMPLES).aggregate_train(
        1, replies[:3]
    )
    for key in ("l0", "l1", "l2", "l3"):
        np.testing.assert_allclose(
            got[key].numpy(), want[key].numpy(), rtol=1e-6, atol=1e-6
        )
    assert dict(metrics) == pytest.approx(dict(want_metrics))


@pytest.mark.parametrize("case", ["nan", "inf", "shape", "dtype", "missing"])
def test_check_update_reasons_unchanged(case):
    ref, good, bad = _bad_updates()
    update, reason = bad[case]
    assert check_update(ref, good) is None
    assert check_update(ref, update) == reason


def test_earlier_nan_is_reported_before_a_later_shape_error():
    # a key-by-key check meets the NaN in 'l0' before the shape of 'l1'
    ref, good, _ = _bad_updates()
    l0 = good["l0"].numpy().copy()
    l0[0] = np.nan
    update = _with(_with(good, "l0", l0), "l1", np.zeros((5, 7), np.float32))
    assert check_update(ref, update) == "array 'l0' has NaN or Inf values"


def test_bytes_that_disagree_with_the_metadata_are_rejected():
    ref, good, _ = _bad_updates()
    honest = Array(np.zeros((5, 7), np.float32))
    liar = Array(dtype="float32", shape=(7, 5), stype=honest.stype, data=honest.data)
    problem = check_update(ref, _with(good, "l1", np.zeros((7, 5), np.float32)))
    assert problem is None
    update = ArrayRecord({k: liar if k == "l1" else good[k] for k in good.keys()})
    assert check_update(ref, update) == "array 'l1' has shape (5, 7), expected (7, 5)"


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x93NUMPY\x01\x00\xff\x00{"])
def test_unreadable_bytes_are_rejected_not_a_crash(data):
    ref, good, _ = _bad_updates()
    junk = Array(dtype="float32", shape=(7, 5), stype=packing.NUMPY_STYPE, data=data)
    update = ArrayRecord({k: junk if k == "l1" else good[k] for k in good.keys()})
    assert check_update(ref, update) == "array 'l1' is not a readable numpy array"


def test_huge_finite_update_is_a_norm_outlier_not_nan():
    ref = _state(100)
    huge = _with(ref, "l0", np.full(300_001, 1e30, np.float32))
    assert check_update(ref, huge) is None
    norm = update_norm(ref, huge)
    assert np.isfinite(norm) and norm == pytest.approx(
        1e30 * np.sqrt(300_001), rel=1e-3
    )
    s = _wrapper(reference=ref, norm_factor=10.0)
    replies = _replies([_state(1), _state(2)], [1, 1]) + [
        train_reply(9, "bad", huge, 1)
    ]
    got, _ = s.aggregate_train(1, replies)
    assert "guard-norm-factor" in s._current.rejected["bad"]
    assert "NaN" not in s._current.rejected["bad"]
    assert s._current.update_norms["bad"] == pytest.approx(norm, rel=1e-5)
    assert np.isfinite(got["l0"].numpy()).all()


def test_norms_match_a_float64_reference():
    ref, good = _state(100), _state(7)
    want = np.sqrt(
        sum(
            float(np.sum((good[k].numpy().astype(np.float64) - ref[k].numpy()) ** 2))
            for k in ref.keys()
            if k != "steps"
        )
    )
    assert update_norm(ref, good) == pytest.approx(want, rel=1e-5)
    scans, _ = updates.scan_updates(ref, [good, good])
    assert [sc.norm for sc in scans] == pytest.approx([want, want], rel=1e-5)


def test_mean_only_over_updates_that_passed():
    ref = _state(100)
    scans, mean = updates.scan_updates(ref, [_state(1), None], [0.5, 0.5])
    assert scans[1].problem == "reply carries no model arrays" and mean is None
    _, mean = updates.scan_updates(ref, [_state(1), _state(2)], [0.25, 0.75])
    want = aggregate_arrayrecords(
        [
            train_reply(1, "a", _state(1), 1).content,
            train_reply(2, "b", _state(2), 3).content,
        ],
        wire.NUM_EXAMPLES,
    )
    # Flower's arithmetic, in Flower's order: the very same npy bytes
    for key in want.keys():
        assert mean[key].data == want[key].data, key
        assert (mean[key].dtype, mean[key].shape) == (want[key].dtype, want[key].shape)


@pytest.mark.parametrize("size", [0, 1, 5, updates.CHUNK, 2 * updates.CHUNK + 3])
def test_mean_bytes_across_chunk_boundaries(size):
    recs = [
        ArrayRecord(
            {"w": Array(np.random.default_rng(s).standard_normal(size, np.float32))}
        )
        for s in range(3)
    ]
    _, mean = updates.scan_updates(recs[0], recs, [0.2, 0.3, 0.5])
    want = aggregate_arrayrecords(
        [
            train_reply(i + 1, "s", r, n).content
            for i, (r, n) in enumerate(zip(recs, [2, 3, 5], strict=True))
        ],
        wire.NUM_EXAMPLES,
    )
    assert mean["w"].data == want["w"].data
