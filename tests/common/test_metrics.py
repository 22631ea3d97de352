import pytest
import torch

from common.metrics import (
    KITS_REGIONS,
    SURFACE_DICE_TOLERANCES_MM,
    mean_by_region,
    region_dice,
    region_surface_dice,
)


def _vol(values: dict[tuple[int, int, int], int]) -> torch.Tensor:
    v = torch.zeros((1, 1, 4, 4, 4), dtype=torch.long)
    for idx, lab in values.items():
        v[(0, 0, *idx)] = lab
    return v


def test_hand_computed_dice_per_region():
    # truth: 2 kidney voxels, 2 tumour voxels; prediction: 1 kidney right, 1 kidney
    # where tumour is, 1 tumour right.
    truth = _vol({(0, 0, 0): 1, (0, 0, 1): 1, (1, 0, 0): 2, (1, 0, 1): 2})
    pred = _vol({(0, 0, 0): 1, (1, 0, 0): 1, (1, 0, 1): 2})
    d = region_dice(pred, truth)[0]
    kidney = 2 * 3 / (3 + 4)  # kidney+masses: pred 3 voxels, truth 4, overlap 3
    tumour = 2 * 1 / (1 + 2)
    assert torch.allclose(d, torch.tensor([kidney, tumour, tumour]), atol=1e-6)


def test_empty_conventions():
    empty = _vol({})
    some = _vol({(2, 2, 2): 2})
    assert region_dice(empty, empty).tolist() == [[1.0, 1.0, 1.0]]  # both empty
    assert region_dice(some, empty).tolist() == [[0.0, 0.0, 0.0]]  # pred only
    assert region_dice(empty, some).tolist() == [[0.0, 0.0, 0.0]]  # truth only


def test_cyst_counts_as_mass_not_tumour():
    truth = _vol({(0, 0, 0): 3})
    d = region_dice(truth.clone(), truth)[0].tolist()
    assert d == [1.0, 1.0, 1.0]  # tumour region empty in both -> 1
    pred_tumour = _vol({(0, 0, 0): 2})
    values = region_dice(pred_tumour, truth)[0].tolist()
    d = dict(zip(KITS_REGIONS, values, strict=True))
    assert d == {"kidney": 1.0, "masses": 1.0, "tumour": 0.0}


def test_mean_by_region():
    rows = [torch.tensor([[1.0, 0.5, 0.0]]), torch.tensor([[0.0, 0.5, 1.0]])]
    assert mean_by_region(rows) == {"kidney": 0.5, "masses": 0.5, "tumour": 0.5}


def _cube(z0: int, size: int = 6) -> torch.Tensor:
    v = torch.zeros((1, 1, size, size, size), dtype=torch.long)
    v[0, 0, 2:4, 2:4, z0 : z0 + 2] = 1  # a 2x2x2 kidney cube: every voxel is edge
    return v


def test_surface_dice_by_hand_with_spacing_and_tolerance():
    truth, pred = _cube(2), _cube(3)  # shifted one voxel along the third axis
    # Half of each boundary coincides (distance 0); the other half lies one voxel
    # away along axis 3, i.e. 2 mm at spacing (1, 1, 2): inside a 2 mm tolerance,
    # outside a 1 mm one.
    tight = region_surface_dice(pred, truth, (1.0, 1.0, 2.0), (1.0, 1.0, 1.0))
    loose = region_surface_dice(pred, truth, (1.0, 1.0, 2.0), (2.0, 2.0, 2.0))
    fine = region_surface_dice(pred, truth, (1.0, 1.0, 0.5), (1.0, 1.0, 1.0))
    # masses and tumour are empty in both -> 1 by convention
    assert tight.tolist() == [[0.5, 1.0, 1.0]]
    assert loose.tolist() == [[1.0, 1.0, 1.0]]
    assert fine.tolist() == [[1.0, 1.0, 1.0]]  # 0.5 mm apart at finer spacing
    assert region_dice(pred, truth)[0, 0].item() == 0.5  # overlap 4 of 8 + 8


def test_surface_dice_empty_conventions():
    empty = _vol({})
    some = _vol({(2, 2, 2): 2})
    sp = (1.0, 1.0, 1.0)
    assert region_surface_dice(empty, empty, sp).tolist() == [[1.0, 1.0, 1.0]]
    assert region_surface_dice(some, empty, sp).tolist() == [[0.0, 0.0, 0.0]]
    assert region_surface_dice(empty, some, sp).tolist() == [[0.0, 0.0, 0.0]]
    cyst = _vol({(2, 2, 2): 3})  # a cyst: a mass, not a tumour
    assert region_surface_dice(cyst, cyst, sp).tolist() == [[1.0, 1.0, 1.0]]
    assert region_surface_dice(some, cyst, sp).tolist() == [[1.0, 1.0, 0.0]]


def test_surface_dice_needs_one_tolerance_per_region():
    import pytest

    with pytest.raises(ValueError, match="3 surface Dice tolerances"):
        region_surface_dice(_vol({}), _vol({}), (1.0, 1.0, 1.0), (1.0, 1.0))


def test_plan_tolerances_default_and_validation():
    import pytest

    from common.config import ConfigError, Plan, load_plan

    assert Plan().surface_dice_tolerance_mm == SURFACE_DICE_TOLERANCES_MM
    plan = load_plan({"surface-dice-tolerance-mm": "2,2,3"})
    assert plan.surface_dice_tolerance_mm == (2.0, 2.0, 3.0)
    with pytest.raises(ConfigError, match="surface-dice-tolerance-mm"):
        load_plan({"surface-dice-tolerance-mm": "1,-1,1"})


def _case(tumour: bool, pred_tumour_voxels: int = 0):
    """A 1x1x8x8x8 case: kidney in a block, a tumour voxel block if asked."""
    import torch

    truth = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    truth[..., 2:6, 2:6, 2:6] = 1
    if tumour:
        truth[..., 3:5, 3:5, 3:5] = 2
    pred = truth.clone()
    pred[pred == 2] = 1  # a model that never predicts tumour where there is one
    if pred_tumour_voxels:
        pred.view(-1)[:pred_tumour_voxels] = 2
    return pred, truth


def test_tumour_dice_is_a_mean_over_cases_with_a_tumour():
    """A model that never predicts tumour scores tumour Dice 0, not the share of
    tumour-free validation cases (the old empty-mask mean gave 0.4 here)."""
    from common.metrics import case_rows, summarise_cases

    rows = []
    for tumour in (True, True, True, False, False):
        rows += case_rows(*_case(tumour), spacing_mm=(2.0, 2.0, 2.5))
    out = summarise_cases(rows)
    assert out["dice-tumour"] == 0.0
    assert out["cases-tumour"] == 3 and out["cases-no-tumour"] == 2
    assert out["fp-rate-tumour"] == 0.0 and out["fp-ml-tumour"] == 0.0
    assert out["dice-kidney"] > 0.9 and "fp-rate-kidney" not in out
    assert "dice-cyst" not in out and out["cases-no-cyst"] == 5  # no case has one
    # the old convention, for the record: empty-empty scored 1
    assert mean_by_region(
        [region_dice(*_case(t)) for t in (True, True, True, False, False)]
    )["tumour"] == pytest.approx(0.4)


def test_false_positives_are_scored_on_cases_without_the_region():
    from common.metrics import case_rows, summarise_cases

    rows = case_rows(*_case(False, pred_tumour_voxels=10), spacing_mm=(2.0, 2.0, 2.5))
    rows += case_rows(*_case(False), spacing_mm=(2.0, 2.0, 2.5))
    out = summarise_cases(rows)
    assert out["fp-rate-tumour"] == 0.5
    assert out["fp-ml-tumour"] == pytest.approx(10 * 10.0 / 1000 / 2)  # 10 mm3/voxel
    assert "dice-tumour" not in out


def test_site_means_are_weighted_by_the_cases_they_describe():
    from server.reporting.round_record import weighted_eval_means

    sites = {
        "a": {
            "dice-tumour": 0.2,
            "cases-tumour": 1,
            "cases-no-tumour": 9,
            "fp-rate-tumour": 0.0,
            "num-val-cases": 10,
        },
        "b": {
            "dice-tumour": 0.8,
            "cases-tumour": 9,
            "cases-no-tumour": 1,
            "fp-rate-tumour": 1.0,
            "num-val-cases": 10,
        },
    }
    means = weighted_eval_means(sites)
    assert means["dice-tumour"] == pytest.approx((0.2 * 1 + 0.8 * 9) / 10)
    assert means["fp-rate-tumour"] == pytest.approx((0.0 * 9 + 1.0 * 1) / 10)
    assert means["cases-tumour"] == 10
