"""The "unlike the training data" score: features, pooling, calibration, and
refusing what a hostile site could send (``common/ood.py``)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.ood import (
    FEATURES,
    STD_FLOOR,
    SYNTHETIC_ONLY_WARNING,
    THRESHOLDS,
    check_reference,
    choose_threshold,
    exceedance,
    feature_sums,
    furthest,
    model_warnings,
    ood_score,
    pooled_reference,
    scan_features,
    sidecar_reference,
    synthetic_only,
)

N = len(FEATURES)


def test_features_of_a_hand_made_volume():
    data = np.full((10, 20, 5), -1000.0, dtype=np.float32)  # air
    body = np.linspace(-100.0, 100.0, 101)  # 101 body voxels, uniform in HU
    data.reshape(-1)[: body.size] = body
    vols = {"kidney": 150.0, "tumour": 20.0, "cyst": 10.0}
    f = scan_features(data, (2.0, 1.0, 4.0), vols)
    assert f.shape == (N,)
    want = [
        *np.log([2.0, 1.0, 4.0]),
        *np.log([20.0, 20.0, 20.0]),  # field of view in mm per axis
        -90.0,  # 5th, 50th, 95th percentile of -100..100 in steps of 2
        0.0,
        90.0,
        math.log1p(180.0),  # kidney + masses
        math.log1p(20.0),
    ]
    assert f == pytest.approx(want)


def test_a_scan_without_body_voxels_is_as_far_off_as_air():
    f = scan_features(
        np.full((4, 4, 4), -1000.0),
        (1, 1, 1),
        dict.fromkeys(("kidney", "tumour", "cyst"), 0.0),
    )
    assert list(f[6:9]) == [-1000.0] * 3 and np.all(np.isfinite(f))


@pytest.mark.parametrize(
    "zooms, vols",
    [
        ((0.0, 1.0, 1.0), {"kidney": 1, "tumour": 0, "cyst": 0}),
        ((1.0, 1.0), {"kidney": 1, "tumour": 0, "cyst": 0}),
        ((1.0, 1.0, 1.0), {"kidney": 1, "tumour": 0}),  # no cyst
        ((1.0, 1.0, 1.0), {"kidney": -1, "tumour": 0, "cyst": 0}),
        ((1.0, 1.0, 1.0), {"kidney": math.nan, "tumour": 0, "cyst": 0}),
    ],
)
def test_features_refuse_nonsense(zooms, vols):
    with pytest.raises(ValueError):
        scan_features(np.zeros((4, 4, 4)), zooms, vols)


def _rows(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.asarray(STD_FLOOR) * 5  # spreads well above the floors
    return rng.normal(0, 1, (n, N)) * scale + np.arange(N)


def test_pooled_reference_equals_the_pooled_rows():
    rows = _rows(23)
    sites = [rows[:2], rows[2:17], rows[17:]]  # uneven: 2, 15, 6 patients
    ref = pooled_reference([feature_sums(list(s)) for s in sites])
    assert ref["features"] == list(FEATURES) and ref["patients"] == 23
    assert ref["mean"] == pytest.approx(rows.mean(axis=0).tolist(), rel=1e-9)
    want = np.maximum(rows.std(axis=0, ddof=1), STD_FLOOR)
    assert ref["std"] == pytest.approx(want.tolist(), rel=1e-9)
    # By site name too, and a site with no patients changes nothing.
    named = {f"site-{i}": feature_sums(list(s)) for i, s in enumerate(sites)}
    named["empty"] = feature_sums([])
    assert pooled_reference(named) == ref


def test_constant_features_are_floored_not_zero():
    rows = np.tile(np.arange(N, dtype=float), (5, 1))  # phantoms: all alike
    ref = pooled_reference([feature_sums(list(rows))])
    assert ref["std"] == pytest.approx(list(STD_FLOOR))
    far = rows[0] + 3 * np.asarray(STD_FLOOR)
    assert ood_score(far, ref) == pytest.approx(3.0)


def test_score_is_zero_at_the_mean_and_grows_with_distance():
    ref = pooled_reference([feature_sums(list(_rows(40)))])
    mean, std = np.asarray(ref["mean"]), np.asarray(ref["std"])
    assert ood_score(mean, ref) == 0.0
    direction = np.random.default_rng(1).normal(size=N)
    scores = [ood_score(mean + k * direction * std, ref) for k in (0.5, 1, 2, 4)]
    assert scores == sorted(scores) and scores[0] > 0
    # one feature 6 SD off: RMS over all features
    x = mean.copy()
    x[4] += 6 * std[4]
    assert ood_score(x, ref) == pytest.approx(6 / math.sqrt(N))
    assert next(iter(furthest(x, ref))) == FEATURES[4]


def test_exceedance_is_the_share_above_each_threshold():
    shares = exceedance([0.5, 1.0, 2.2, 3.1, 9.0])
    assert len(shares) == len(THRESHOLDS)
    assert shares[0] == pytest.approx(3 / 5)  # above 1.5: 2.2, 3.1, 9
    assert shares[THRESHOLDS.index(3.0)] == pytest.approx(2 / 5)
    assert shares[-1] == pytest.approx(1 / 5)  # above 8: 9
    for bad in ([], [1.0, math.inf], [-0.1]):
        with pytest.raises(ValueError):
            exceedance(bad)


def test_choose_threshold_by_hand():
    zeros = [0.0] * len(THRESHOLDS)
    #        1.5   2    2.5   3    3.5  4    5    6    8
    a = [0.50, 0.30, 0.10, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0]  # 20 patients
    b = [0.80, 0.60, 0.20, 0.15, 0.1, 0.05, 0.0, 0.0, 0.0]  # 60 patients
    got = choose_threshold({"a": a, "b": b}, {"a": 20, "b": 60})
    # pooled at 3.0: (1 + 9) / 80 = 0.125; at 3.5: 6 / 80 = 0.075; 4.0: 3/80
    assert got == {
        "threshold": 4.0,
        "false-alarm-rate": pytest.approx(3 / 80),
        "calibrated-on": 80,
        "target": 0.05,
    }
    assert (
        choose_threshold({"a": a, "b": b}, {"a": 20, "b": 60}, 0.2)["threshold"] == 2.5
    )  # (2 + 12) / 80 = 0.175
    assert choose_threshold({"a": zeros}, {"a": 5})["threshold"] == THRESHOLDS[0]
    # Never low enough: the largest threshold, with its (too high) rate.
    ones = {"a": [1.0] * len(THRESHOLDS)}
    assert choose_threshold(ones, {"a": 3}) == {
        "threshold": THRESHOLDS[-1],
        "false-alarm-rate": 1.0,
        "calibrated-on": 3,
        "target": 0.05,
    }


@pytest.mark.parametrize(
    "shares, counts, why",
    [
        ({"a": [0.0] * 3}, {"a": 5}, "need 9"),
        ({"a": [0.1] * 9}, {"b": 5}, "differ"),
        ({"a": [0.1] * 9}, {"a": -1}, "negative"),
        ({"a": [0.1] * 9}, {"a": 0}, "no validation"),
        ({"a": [0.1] * 9}, {"a": 2.5}, "whole number"),
        ({"a": [0.1] * 9}, {"a": True}, "whole number"),
        ({"a": [1.5] * 9}, {"a": 4}, "[0, 1]"),
        ({"a": [math.nan] * 9}, {"a": 4}, "non-finite"),
        ({"a": [0.0] * 8 + [0.5]}, {"a": 4}, "grow"),
    ],
)
def test_choose_threshold_refuses_hostile_input(shares, counts, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        choose_threshold(shares, counts)


@pytest.mark.parametrize(
    "sums, why",
    [
        ({"n": 3, "sum": [0.0] * (N - 1), "sumsq": [1.0] * N}, "need 11"),
        ({"n": -3, "sum": [0.0] * N, "sumsq": [1.0] * N}, "negative count"),
        ({"n": 3, "sum": [math.inf] * N, "sumsq": [1.0] * N}, "non-finite"),
        ({"n": 3, "sum": [0.0] * N, "sumsq": [-1.0] * N}, "negative sum"),
        ({"n": 2, "sum": [10.0] * N, "sumsq": [1.0] * N}, "smaller than"),
        ({"n": 0, "sum": [1.0] * N, "sumsq": [1.0] * N}, "0 patients"),
        ({"n": 3, "sum": ["1"] * N, "sumsq": [1.0] * N}, "need 11"),
        ({"n": 3, "sum": [0.0] * N}, "missing"),
        ({"n": 1, "sum": [0.0] * N, "sumsq": [0.0] * N}, "at least 2"),
    ],
)
def test_pooled_reference_refuses_hostile_sums(sums, why):
    with pytest.raises(ValueError, match=why):
        pooled_reference([sums])


_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.booleans(),
    st.text(max_size=3),
    st.none(),
)
_site = st.fixed_dictionaries(
    {
        "n": _number,
        "sum": st.lists(_number, min_size=N - 1, max_size=N + 1),
        "sumsq": st.lists(_number, min_size=N - 1, max_size=N + 1),
    }
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_site, min_size=1, max_size=4))
def test_random_site_sums_give_a_finite_reference_or_a_value_error(sites):
    try:
        ref = pooled_reference(sites)
    except ValueError:
        return
    assert np.all(np.isfinite(ref["mean"])) and np.all(np.isfinite(ref["std"]))
    assert np.all(np.asarray(ref["std"]) >= np.asarray(STD_FLOOR))
    assert ref["patients"] >= 2


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(min_value=-1e6, max_value=1e6), min_size=N, max_size=N),
    st.integers(min_value=2, max_value=50),
    st.sampled_from(["nan", "inf", "short", "negative-n", "bad-sumsq"]),
)
def test_each_kind_of_malformed_sum_is_refused(row, n, damage):
    good = feature_sums([np.asarray(row)] * n)
    bad = dict(good, sum=list(good["sum"]), sumsq=list(good["sumsq"]))
    if damage == "nan":
        bad["sum"][3] = math.nan
    elif damage == "inf":
        bad["sumsq"][0] = math.inf
    elif damage == "short":
        bad["sum"] = bad["sum"][:-1]
    elif damage == "negative-n":
        bad["n"] = -n
    else:  # a variance below zero
        bad["sumsq"][5] = bad["sum"][5] ** 2 / n * 0.5 - 1.0
    with pytest.raises(ValueError):
        pooled_reference([good, bad])


def test_sidecar_reference_merges_and_checks():
    ref = pooled_reference([feature_sums(list(_rows(10)))])
    cal = choose_threshold({"a": exceedance([0.5, 1.0, 1.2])}, {"a": 3})
    side = sidecar_reference(ref, cal)
    assert set(side) == {
        "features",
        "mean",
        "std",
        "patients",
        "threshold",
        "false-alarm-rate",
        "calibrated-on",
        "target",
    }
    assert side["threshold"] == 1.5
    with pytest.raises(ValueError, match="features"):
        check_reference({**side, "features": list(FEATURES[:-1])})
    with pytest.raises(ValueError, match="positive"):
        check_reference({**side, "std": [0.0] * N})
    with pytest.raises(ValueError, match="threshold"):
        check_reference({**side, "threshold": math.nan})


def test_provenance_of_the_sidecar():
    synthetic = {"synthetic-only": True, "sites": {"a": "synthetic"}}
    assert synthetic_only({"training-data": synthetic}) is True
    assert model_warnings({"training-data": synthetic}) == [SYNTHETIC_ONLY_WARNING]
    real = {"synthetic-only": False, "sites": {"a": "real", "b": "synthetic"}}
    assert synthetic_only({"training-data": real}) is False
    assert model_warnings({"training-data": real}) == []
    # Every source synthetic, though the flag is missing: synthetic-only.
    implied = {"sites": {"a": "synthetic"}, "pretrained-on": "synthetic"}
    assert synthetic_only({"training-data": implied}) is True
    unknown = {"sites": {"a": "unknown"}, "pretrained-on": None}
    assert synthetic_only({"training-data": unknown}) is None
    one_real = {"sites": {"a": "unknown", "b": "real"}}
    assert synthetic_only({"training-data": one_real}) is False
    for old in ({}, {"training-data": None}, {"training-data": "x"}):
        assert synthetic_only(old) is None and model_warnings(old) == []
