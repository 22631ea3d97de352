import torch

from common.metrics import KITS_REGIONS, mean_by_region, region_dice


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
