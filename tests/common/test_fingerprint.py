"""The federated preprocessing plan equals what pooling all voxels would give."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.fingerprint import (
    EDGES,
    SPACING_QUANTILES,
    anonymous_histogram,
    combine,
    hist_percentile,
    site_fingerprint,
)
from sim.phantoms.ct import generate_case
from sim.phantoms.profiles import PROFILES

BIN = EDGES[1] - EDGES[0]


def _site(profile: str, seeds: range):
    cases = [generate_case(PROFILES[profile], s, scale=4.0) for s in seeds]
    return [(c.image, c.label, c.spacing) for c in cases]


def test_pooled_percentiles_match_direct_within_one_bin():
    sites = {
        "a": _site("thin-slice-cm", range(0, 3)),
        "b": _site("standard-nephro", range(10, 14)),
        "c": _site("thick-slice-noisy", range(20, 22)),
    }
    prints = {k: site_fingerprint(v) for k, v in sites.items()}
    pooled_fg = np.concatenate(
        [img[lab > 0] for cases in sites.values() for img, lab, _ in cases]
    )
    prep = combine(prints)
    lo, hi = prep["hu-window"]
    assert abs(lo - np.percentile(pooled_fg, 0.5)) <= BIN
    assert abs(hi - np.percentile(pooled_fg, 99.5)) <= BIN
    assert prep["foreground-mean"] == pytest.approx(pooled_fg.mean(), abs=BIN)
    assert prep["foreground-std"] == pytest.approx(pooled_fg.std(), rel=0.02)
    assert prep["cases"] == 9 and prep["sites"] == ["a", "b", "c"]


def test_spacing_is_case_weighted_median_of_site_medians():
    fp = {
        "big": {
            "n-cases": 10.0,
            "spacing-q": [0, 1.0, 0, 0, 1.0, 0, 0, 2.0, 0],
            "extent-mm": [300.0, 200.0, 100.0],
            "fg-hist": [1.0] + [0.0] * (len(EDGES) - 2),
        },
        "small": {
            "n-cases": 3.0,
            "spacing-q": [0, 3.0, 0, 0, 3.0, 0, 0, 5.0, 0],
            "extent-mm": [30.0, 20.0, 10.0],
            "fg-hist": [1.0] + [0.0] * (len(EDGES) - 2),
        },
    }
    prep = combine(fp, max_patch=(128, 128, 32))
    assert prep["spacing-mm"] == [1.0, 1.0, 2.0]
    # median extent 300 x 200 x 100 mm at 1 x 1 x 2 mm, capped at 128 x 128 x 32
    assert prep["patch-size"] == [128, 128, 32]
    small = combine(fp, max_patch=(512, 512, 512))["patch-size"]
    assert small == [288, 192, 48]  # 300/1 -> 288, 200/1 -> 192, 100/2 -> 48


def test_fingerprint_holds_aggregates_only():
    fp = site_fingerprint(_site("standard-nephro", range(3)))
    assert set(fp) == {"n-cases", "spacing-q", "extent-mm", "fg-hist", "label-ml"}
    assert fp["n-cases"] == 3.0 and len(fp["fg-hist"]) == len(EDGES) - 1
    assert len(fp["spacing-q"]) == 9 and len(fp["label-ml"]) == 3


def test_empty_histogram_is_an_error():
    with pytest.raises(ValueError, match="no foreground"):
        hist_percentile(np.zeros(len(EDGES) - 1), 50)


# -- every statistic describes at least the floor of patients (issue 27) -------

_spacings = st.lists(
    st.tuples(*[st.floats(0.3, 6.0, allow_nan=False)] * 3), min_size=1, max_size=12
)


def _cases(spacings, shapes=None):
    """Tiny cases with the given spacings (and shapes: the extents)."""
    out = []
    for i, sp in enumerate(spacings):
        shape = shapes[i] if shapes else (4, 4, 4)
        image = np.full(shape, 40.0 + i)
        label = np.zeros(shape, np.uint8)
        label[0, 0, 0] = 1
        out.append((image, label, sp))
    return out


def _windows(values, k):
    v = np.sort(np.asarray(values, float))
    return [v[s : s + k].mean() for s in range(len(v) - k + 1)]


@settings(max_examples=100, deadline=None)
@given(spacings=_spacings, data=st.data())
def test_spacing_quantiles_are_means_of_floor_patients(spacings, data):
    k = data.draw(st.integers(1, len(spacings)))
    fp = site_fingerprint(_cases(spacings), floor=k)
    sp = np.asarray(spacings)
    nq = len(SPACING_QUANTILES)
    for a in range(3):
        windows = _windows(sp[:, a], k)
        for i in range(nq):
            released = fp["spacing-q"][a * nq + i]
            # the mean of k patients' values: k neighbours in sorted order
            assert min(abs(released - w) for w in windows) <= 1e-9


@settings(max_examples=100, deadline=None)
@given(spacings=_spacings, data=st.data())
def test_one_patient_moves_each_quantile_by_at_most_range_over_floor(spacings, data):
    k = data.draw(st.integers(1, len(spacings)))
    who = data.draw(st.integers(0, len(spacings) - 1))
    new = data.draw(st.tuples(*[st.floats(0.3, 6.0, allow_nan=False)] * 3))
    changed = list(spacings)
    changed[who] = new
    before = site_fingerprint(_cases(spacings), floor=k)
    after = site_fingerprint(_cases(changed), floor=k)
    values = np.asarray(list(spacings) + [new])
    nq = len(SPACING_QUANTILES)
    for a in range(3):
        span = values[:, a].max() - values[:, a].min()
        for i in range(nq):
            j = a * nq + i
            assert abs(after["spacing-q"][j] - before["spacing-q"][j]) <= (
                span / k + 1e-9
            )


def test_extent_median_is_a_mean_of_floor_patients():
    # extents along x: 4, 8, 12, 40, 44 voxels of 1 mm; an exact median would be
    # the third patient's 12 mm
    shapes = [(n, 4, 4) for n in (4, 8, 12, 40, 44)]
    fp = site_fingerprint(_cases([(1.0, 1.0, 1.0)] * 5, shapes), floor=3)
    assert fp["extent-mm"][0] == pytest.approx((8 + 12 + 40) / 3)
    with pytest.raises(ValueError, match="floor"):
        site_fingerprint(_cases([(1.0, 1.0, 1.0)] * 2), floor=3)


@settings(max_examples=150, deadline=None)
@given(
    counts=st.lists(
        st.lists(st.integers(0, 3), min_size=6, max_size=6), min_size=1, max_size=8
    ),
    floor=st.integers(1, 5),
    data=st.data(),
)
def test_a_bin_under_the_floor_hides_its_patients(counts, floor, data):
    per_patient = np.asarray(counts, float)
    hist = anonymous_histogram(per_patient, floor)
    contributors = (per_patient > 0).sum(0)
    for b in range(per_patient.shape[1]):
        if contributors[b] >= floor:
            assert hist[b] == per_patient[:, b].sum()
        else:
            assert hist[b] == 0
            # removing one contributing patient from the bin changes nothing
            for p in np.flatnonzero(per_patient[:, b]):
                less = per_patient.copy()
                less[p, b] = 0
                assert np.array_equal(anonymous_histogram(less, floor), hist)


def test_fingerprint_bins_and_labels_under_the_floor_are_zero():
    cases = _cases([(1.0, 1.0, 1.0)] * 4)
    # one patient has a foreground voxel at 2000 HU and the only cyst (label 3)
    image, label, sp = cases[0]
    image[1, 1, 1], label[1, 1, 1] = 2000.0, 3
    fp = site_fingerprint(cases, floor=2)
    rare = int(np.searchsorted(EDGES, 2000.0, side="right") - 1)
    assert fp["fg-hist"][rare] == 0 and fp["label-ml"][2] == 0.0
    assert fp["label-ml"][0] == pytest.approx(4 * 0.001)  # kidney: every patient
    label[1, 1, 1] = 0  # that patient's voxel leaves the bin: nothing changes
    assert site_fingerprint(cases, floor=2)["fg-hist"] == fp["fg-hist"]
    # floor 1 sends the bin and the label as before
    label[1, 1, 1] = 3
    exact = site_fingerprint(cases, floor=1)
    assert exact["fg-hist"][rare] == 1 and exact["label-ml"][2] > 0


def test_coordinator_combines_fingerprints_built_with_a_floor():
    sites = {
        "a": _site("thin-slice-cm", range(0, 3)),
        "b": _site("standard-nephro", range(10, 14)),
        "c": _site("thick-slice-noisy", range(20, 22)),
    }
    prints = {k: site_fingerprint(v, floor=2) for k, v in sites.items()}
    pooled_fg = np.concatenate(
        [img[lab > 0] for cases in sites.values() for img, lab, _ in cases]
    )
    prep = combine(prints)
    lo, hi = prep["hu-window"]
    # the tail bins few patients reach are left out: the window can only narrow
    assert np.percentile(pooled_fg, 0.5) - BIN <= lo < hi
    assert hi <= np.percentile(pooled_fg, 99.5) + BIN
    assert prep["cases"] == 9 and all(s > 0 for s in prep["spacing-mm"])
    assert all(p % 16 == 0 for p in prep["patch-size"])
