"""Segmentation metrics per KiTS region, on label maps.

KiTS evaluates nested regions rather than raw classes:
kidney+masses = labels {1, 2, 3}, masses = {2, 3}, tumour = {2}.
Conventions (KiTS): when both prediction and truth are empty, Dice is 1; when
only one is empty, Dice is 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from monai.metrics import compute_dice

# kidneyfl's label values (KiTS21/23); every layout is mapped onto these.
LABELS: dict[int, str] = {0: "background", 1: "kidney", 2: "tumour", 3: "cyst"}

KITS_REGIONS: dict[str, tuple[int, ...]] = {
    "kidney": (1, 2, 3),
    "masses": (2, 3),
    "tumour": (2,),
}


def region_masks(labels: torch.Tensor) -> torch.Tensor:
    """One binary channel per KiTS region.

    Parameters
    ----------
    labels : torch.Tensor
        Integer label map of shape ``(B, 1, *spatial)`` or ``(B, *spatial)``.

    Returns
    -------
    torch.Tensor
        Float tensor ``(B, len(KITS_REGIONS), *spatial)``.
    """
    if labels.dim() >= 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    chans = [
        torch.isin(labels, torch.tensor(v, device=labels.device))
        for v in KITS_REGIONS.values()
    ]
    return torch.stack(chans, dim=1).float()


def region_dice(pred_labels: torch.Tensor, true_labels: torch.Tensor) -> torch.Tensor:
    """Dice per case and region, with KiTS' empty-mask conventions.

    Returns
    -------
    torch.Tensor
        ``(B, n_regions)``; every value is finite.
    """
    pred, true = region_masks(pred_labels), region_masks(true_labels)
    dice = compute_dice(pred, true, include_background=True, ignore_empty=False)
    # MONAI gives 1 for (empty truth, empty prediction) and 0 for (empty truth,
    # non-empty prediction) with ignore_empty=False; an empty prediction against a
    # non-empty truth is 0 by the formula. Guard against NaN all the same.
    return torch.nan_to_num(dice, nan=0.0)


def mean_by_region(dice_rows: Iterable[torch.Tensor]) -> dict[str, float]:
    """Mean over cases of per-case region Dice rows -> ``{region: mean}``."""
    rows = [r.reshape(-1, len(KITS_REGIONS)) for r in dice_rows]
    if not rows:
        return {}
    stacked = torch.cat(rows).float()
    return {name: float(stacked[:, i].mean()) for i, name in enumerate(KITS_REGIONS)}


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Weighted mean of per-site values (weights: e.g. validation cases)."""
    total = sum(weights[k] for k in values)
    if total <= 0:
        return float("nan")
    return sum(values[k] * weights[k] for k in values) / total
