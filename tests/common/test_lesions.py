"""Lesion-level detection metrics on hand-built label maps with known lesions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.lesions import (
    FROC_RATES,
    LesionCase,
    case_lesions,
    components,
    summarise_lesions,
)

SHAPE = (20, 20, 20)


def _empty() -> np.ndarray:
    return np.zeros(SHAPE, dtype=np.uint8)


def _case(
    found: tuple[float, ...] = (), fps: tuple[float, ...] = (), score: float = 0.0
) -> dict[str, LesionCase]:
    """A tumour LesionCase built by hand (found scores of 0 are misses)."""
    return {
        "tumour": LesionCase(
            has_ref=bool(found),
            n_ref=len(found),
            n_found=sum(s > 0 for s in found),
            found_scores=found,
            fp_scores=fps,
            case_score=score,
        )
    }


def test_components_join_diagonal_neighbours() -> None:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2:4, 2:4, 2:4] = True
    mask[4, 4, 4] = True  # touches the cube at a corner only
    mask[10:12, 10:12, 10:12] = True
    labelled, n = components(mask)
    assert n == 2
    assert labelled[2, 2, 2] == labelled[4, 4, 4] != labelled[10, 10, 10]


def test_found_missed_and_five_percent_overlap() -> None:
    true, pred = _empty(), _empty()
    true[2:5, 2:5, 2:5] = 2  # A: 27 voxels, fully predicted -> found
    pred[2:5, 2:5, 2:5] = 2
    true[10:13, 2:5, 2:5] = 2  # B: 27 voxels, nothing predicted -> missed
    true[2:4, 10:15, 10:12] = 2  # C: 20 voxels, 1 predicted (5%) -> not found
    pred[2, 10, 10] = 2
    true[10:12, 10:15, 10:12] = 2  # D: 20 voxels, 2 predicted (10%) -> found
    pred[10, 10, 10:12] = 2
    pred[16:18, 16:18, 16:18] = 2  # E: 8 voxels over no lesion -> false positive

    tumour = case_lesions(pred, true)["tumour"]

    assert tumour.has_ref and tumour.n_ref == 4 and tumour.n_found == 2
    # scores are component sizes without probability maps; C's 1-voxel
    # component overlaps its lesion, so it is neither a detection nor an FP
    assert sorted(tumour.found_scores) == [0.0, 0.0, 2.0, 27.0]
    assert tumour.fp_scores == (8.0,)
    assert tumour.case_score == 27.0


def test_diagonally_touching_reference_pair_is_one_lesion() -> None:
    true, pred = _empty(), _empty()
    true[2:5, 2:5, 2:5] = 2
    true[5:8, 5:8, 5:8] = 2  # meets the first cube at one corner
    pred[5:8, 5:8, 5:8] = 2  # covers half of the joined lesion
    tumour = case_lesions(pred, true)["tumour"]
    assert (tumour.n_ref, tumour.n_found, tumour.fp_scores) == (1, 1, ())


def test_regions_are_kept_apart() -> None:
    true, pred = _empty(), _empty()
    true[2:5, 2:5, 2:5] = 3  # a cyst ...
    pred[2:5, 2:5, 2:5] = 2  # ... called a tumour
    result = case_lesions(pred, true)
    assert not result["tumour"].has_ref and result["tumour"].fp_scores == (27.0,)
    assert result["cyst"].n_ref == 1 and result["cyst"].n_found == 0
    assert result["cyst"].case_score == 0.0


def test_scores_from_probability_maps() -> None:
    true, pred = _empty(), _empty()
    true[2:6, 2:6, 2:6] = 2
    pred[2:4, 2:6, 2:6] = 2  # two predicted pieces of one lesion
    pred[5, 2:6, 2:6] = 2
    pred[15:17, 15:17, 15:17] = 2  # false positive
    prob = np.full(SHAPE, 0.6, dtype=np.float32)
    prob[5, 3, 3] = 0.95  # the second piece's peak
    prob[16, 16, 16] = 0.8
    prob[0, 0, 0] = 1.0  # outside every component: ignored

    tumour = case_lesions(pred, true, prob={"tumour": prob})["tumour"]

    assert tumour.found_scores == pytest.approx((0.95,))
    assert tumour.fp_scores == pytest.approx((0.8,))
    assert tumour.case_score == pytest.approx(0.95)
    # the cyst has no map: sizes; no cyst anywhere: empty
    assert case_lesions(pred, true, prob={"tumour": prob})["cyst"].case_score == 0.0


def test_shape_mismatches_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        case_lesions(_empty(), np.zeros((20, 20, 19), dtype=np.uint8))
    with pytest.raises(ValueError, match="tumour"):
        case_lesions(_empty(), _empty(), prob={"tumour": np.zeros((2, 2, 2))})


def test_auc_and_case_detection_with_a_tie() -> None:
    cases = [
        _case(found=(0.9,), score=0.9),
        _case(found=(0.5,), score=0.5),
        _case(fps=(0.5,), score=0.5),  # ties with the second positive case
        _case(fps=(0.1,), score=0.1),
        _case(),
    ]
    out = summarise_lesions(cases)
    # positive-negative pairs: 0.9 beats all 3; 0.5 ties one (1/2), beats two
    assert out["detect-auc-tumour"] == pytest.approx(5.5 / 6)
    assert out["detect-sens-tumour"] == 1.0
    assert out["detect-spec-tumour"] == pytest.approx(1 / 3)
    assert out["lesion-sens-tumour"] == 1.0
    assert out["fp-lesions-tumour"] == pytest.approx(2 / 5)


def test_froc_on_a_hand_computed_curve() -> None:
    cases = [
        _case(found=(0.9, 0.0), fps=(0.8,), score=0.9),
        _case(found=(0.6,), score=0.6),
        _case(fps=(0.7, 0.2), score=0.7),
        _case(found=(0.3,), score=0.3),
    ]
    # thresholds from the top, as (FP per case, sensitivity):
    # 0.9 (0, 1/4), 0.8 (1/4, 1/4), 0.7 (1/2, 1/4), 0.6 (1/2, 1/2),
    # 0.3 (1/2, 3/4), 0.2 (3/4, 3/4); so at the rates 1/8 .. 8:
    expected = (0.25 + 0.25 + 0.75 + 4 * 0.75) / 7
    assert len(FROC_RATES) == 7
    out = summarise_lesions(cases)
    assert out["froc-tumour"] == pytest.approx(expected)
    assert out["lesion-sens-tumour"] == pytest.approx(3 / 4)
    assert out["fp-lesions-tumour"] == pytest.approx(3 / 4)


def test_froc_counts_the_lowest_scored_lesion_when_none_is_missed() -> None:
    # MONAI never thresholds at the lowest score; here it is a found lesion's
    out = summarise_lesions([_case(found=(0.5,), fps=(0.9,), score=0.9)])
    # (1 FP, sensitivity 1) at 0.5, (1, 0) at 0.9: sensitivity 1 from 1 FP/case
    assert out["froc-tumour"] == pytest.approx(4 / 7)


def test_summary_keys_absent_when_denominators_are_empty() -> None:
    assert summarise_lesions([]) == {}
    without = summarise_lesions([_case(fps=(3.0,), score=3.0), _case()])
    assert set(without) == {"fp-lesions-tumour", "detect-spec-tumour"}
    assert without["detect-spec-tumour"] == 0.5
    only = summarise_lesions([_case(found=(0.0,))])
    assert set(only) == {
        "lesion-sens-tumour",
        "fp-lesions-tumour",
        "detect-sens-tumour",
        "froc-tumour",
    }
    assert only["froc-tumour"] == 0.0 and only["detect-sens-tumour"] == 0.0


def test_summary_of_real_cases_is_finite_and_bounded() -> None:
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(6):
        true = (rng.random(SHAPE) > 0.97).astype(np.uint8) * rng.integers(2, 4)
        pred = (rng.random(SHAPE) > 0.97).astype(np.uint8) * rng.integers(2, 4)
        cases.append(case_lesions(pred, true))
    cases.append(case_lesions(_empty(), _empty()))
    out = summarise_lesions(cases)
    assert {k.split("-")[-1] for k in out} == {"tumour", "cyst"}
    for key, value in out.items():
        assert math.isfinite(value)
        assert value >= 0 and (key.startswith("fp-lesions") or value <= 1)
