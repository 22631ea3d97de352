"""The federated preprocessing plan equals what pooling all voxels would give."""

import numpy as np
import pytest

from common.fingerprint import EDGES, combine, hist_percentile, site_fingerprint
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
