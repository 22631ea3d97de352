"""Segmentation metrics per KiTS region, on label maps.

Reported as KiTS reports them (:func:`summarise_cases`): a region's Dice is the
mean over the cases whose reference contains the region; cases without it are
scored separately, as a false-positive rate (the share of such cases with any
predicted voxel of the region) and the mean predicted volume there. Averaging
the empty-mask convention's 1s into the Dice would reward a model that never
predicts a tumour on a validation set where most cases have none.

KiTS evaluates nested regions rather than raw classes:
kidney+masses = labels {1, 2, 3}, masses = {2, 3}, tumour = {2}.
Two metrics per region, both with KiTS' empty conventions (when prediction and
truth are both empty the score is 1; when only one is empty it is 0):

- Dice (MONAI ``compute_dice``);
- surface Dice, the normalised surface distance (MONAI ``compute_surface_dice``):
  the fraction of both boundaries lying within a tolerance in mm of the other,
  with distances measured at the voxel spacing of the evaluated volume. The
  KiTS23 tolerances are 1.033 mm (kidney+masses), 1.133 mm (masses) and
  1.150 mm (tumour).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch
from monai.metrics import compute_dice, compute_surface_dice

from common.regions import KITS_REGIONS

# kidneyfl's label values (KiTS21/23); every layout is mapped onto these.
LABELS: dict[int, str] = {0: "background", 1: "kidney", 2: "tumour", 3: "cyst"}

# Regions reported per case: KiTS' three nested regions, and cyst on its own.
REPORT_REGIONS: dict[str, tuple[int, ...]] = {**KITS_REGIONS, "cyst": (3,)}

# KiTS23's surface Dice tolerances in mm, per region in KITS_REGIONS order.
SURFACE_DICE_TOLERANCES_MM: tuple[float, float, float] = (1.033, 1.133, 1.150)


def region_masks(
    labels: torch.Tensor, regions: Mapping[str, tuple[int, ...]] = KITS_REGIONS
) -> torch.Tensor:
    """One binary channel per KiTS region.

    Parameters
    ----------
    labels : torch.Tensor
        Integer label map of shape ``(B, 1, *spatial)`` or ``(B, *spatial)``.

    Returns
    -------
    torch.Tensor
        Float tensor ``(B, len(regions), *spatial)``.
    """
    if labels.dim() >= 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    # equality per value: torch.isin was most of evaluation's time (8x slower)
    chans = []
    for values in regions.values():
        mask = torch.zeros_like(labels, dtype=torch.bool)
        for v in values:
            mask |= labels == v
        chans.append(mask)
    return torch.stack(chans, dim=1).float()


def region_dice(
    pred_labels: torch.Tensor,
    true_labels: torch.Tensor,
    regions: Mapping[str, tuple[int, ...]] = KITS_REGIONS,
) -> torch.Tensor:
    """Dice per case and region, with KiTS' empty-mask conventions.

    Returns
    -------
    torch.Tensor
        ``(B, n_regions)``; every value is finite.
    """
    pred, true = region_masks(pred_labels, regions), region_masks(true_labels, regions)
    dice = compute_dice(pred, true, include_background=True, ignore_empty=False)
    # MONAI gives 1 for (empty truth, empty prediction) and 0 for (empty truth,
    # non-empty prediction) with ignore_empty=False; an empty prediction against a
    # non-empty truth is 0 by the formula. Guard against NaN all the same.
    return torch.nan_to_num(dice, nan=0.0)


def region_surface_dice(
    pred_labels: torch.Tensor,
    true_labels: torch.Tensor,
    spacing_mm: tuple[float, ...],
    tolerances_mm: tuple[float, ...] = SURFACE_DICE_TOLERANCES_MM,
) -> torch.Tensor:
    """Surface Dice (normalised surface distance) per case and KiTS region.

    Parameters
    ----------
    pred_labels, true_labels : torch.Tensor
        Integer label maps ``(B, 1, *spatial)`` on the same grid.
    spacing_mm : tuple of float
        Voxel size of that grid along each spatial axis, in mm.
    tolerances_mm : tuple of float
        One tolerance per region (KITS_REGIONS order), in mm.

    Returns
    -------
    torch.Tensor
        ``(B, n_regions)``: 1 where both are empty, 0 where only one is.
    """
    if len(tolerances_mm) != len(KITS_REGIONS):
        raise ValueError(
            f"need {len(KITS_REGIONS)} surface Dice tolerances (one per region "
            f"{', '.join(KITS_REGIONS)}), got {len(tolerances_mm)}"
        )
    pred, true = region_masks(pred_labels), region_masks(true_labels)
    with warnings.catch_warnings():
        # empty regions are expected (no tumour in a case) and handled below
        warnings.filterwarnings("ignore", message=".* of class .* is all 0")
        nsd = compute_surface_dice(
            pred,
            true,
            class_thresholds=[float(t) for t in tolerances_mm],
            include_background=True,  # every channel is a region, none background
            spacing=[float(s) for s in spacing_mm],
        )
    # MONAI returns NaN when both boundaries are empty and 0 when only one is.
    both_empty = (pred.flatten(2).sum(-1) == 0) & (true.flatten(2).sum(-1) == 0)
    nsd = torch.where(both_empty.to(nsd.device), torch.ones_like(nsd), nsd)
    return torch.nan_to_num(nsd, nan=0.0)


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


def case_rows(
    pred_labels: torch.Tensor, true_labels: torch.Tensor, spacing_mm: tuple[float, ...]
) -> list[dict[str, tuple[float, bool, float]]]:
    """Per case and REPORT_REGIONS region: (Dice, truth has it, predicted mL).

    Kept at the site; only :func:`summarise_cases` of many cases leaves it.
    """
    dice = region_dice(pred_labels, true_labels, REPORT_REGIONS).cpu()
    pred = region_masks(pred_labels, REPORT_REGIONS).flatten(2).sum(-1).cpu()
    true = region_masks(true_labels, REPORT_REGIONS).flatten(2).sum(-1).cpu()
    voxel_ml = float(torch.tensor(spacing_mm, dtype=torch.float64).prod()) / 1000.0
    return [
        {
            name: (
                float(dice[b, i]),
                bool(true[b, i] > 0),
                float(pred[b, i]) * voxel_ml,
            )
            for i, name in enumerate(REPORT_REGIONS)
        }
        for b in range(dice.shape[0])
    ]


def summarise_cases(
    rows: Iterable[Mapping[str, tuple[float, bool, float]]],
) -> dict[str, float]:
    """KiTS-style summary of :func:`case_rows` over a site's validation cases.

    Per region ``r``: ``dice-r`` (mean over cases whose reference contains r;
    absent when none does), ``cases-r`` (how many), ``cases-no-r`` (the others),
    and over those others ``fp-rate-r`` (share with any predicted r) and
    ``fp-ml-r`` (mean predicted volume of r, mL).
    """
    rows = list(rows)
    out: dict[str, float] = {}
    for name in REPORT_REGIONS:
        present = [r[name] for r in rows if r[name][1]]
        absent = [r[name] for r in rows if not r[name][1]]
        out[f"cases-{name}"] = float(len(present))
        out[f"cases-no-{name}"] = float(len(absent))
        if present:
            out[f"dice-{name}"] = sum(d for d, _, _ in present) / len(present)
        if absent:
            out[f"fp-rate-{name}"] = sum(ml > 0 for _, _, ml in absent) / len(absent)
            out[f"fp-ml-{name}"] = sum(ml for _, _, ml in absent) / len(absent)
    return out


def present_mean(values: torch.Tensor, present: torch.Tensor) -> dict[str, float]:
    """Mean per KITS_REGIONS column of ``values`` over the rows where
    ``present`` is true (regions absent from every row are left out)."""
    out = {}
    for i, name in enumerate(KITS_REGIONS):
        mask = present[:, i]
        if bool(mask.any()):
            out[name] = float(values[mask, i].float().mean())
    return out
