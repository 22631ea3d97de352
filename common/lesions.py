"""Lesion-level detection metrics: does the model find each tumour and cyst?

Voxel Dice says how well a lesion's outline is drawn; it says little about
whether a small lesion was found at all, or how many spurious lesions a reader
would have to dismiss. These metrics count lesions, per case and per lesion
type (tumour = label 2, cyst = label 3), and are summarised over a site's
validation cases.

Definitions
-----------
Lesion
    A connected component of the lesion type's voxels, in the reference
    (a *reference lesion*) or in the model's output (a *predicted lesion*).
    Voxels touching by a face, an edge or a corner belong to the same lesion
    (full 26-connectivity in 3D): at the coarse spacing the federation works
    at (4 x 4 x 5 mm), one lesion's boundary is often joined only diagonally,
    and counting it twice would invent a lesion.
Found (true positive)
    A reference lesion is found when the model's voxels of that lesion type
    cover at least 10% of its voxels. The criterion tolerates
    under-segmentation (a lesion drawn too small is still found) but not a
    touch at the edge (a few predicted voxels on its border do not find it).
False-positive lesion
    A predicted lesion that overlaps no reference voxel of that lesion type.
    A predicted lesion that overlaps a reference lesion too little to find it
    is neither a detection nor a false positive.
Score
    Each predicted lesion has a confidence: the highest probability the model
    gave the lesion type within it when probability maps are available,
    otherwise its size in voxels (larger = more confident). A found reference
    lesion takes the highest score of the predicted lesions overlapping it;
    a missed one scores 0. A case's score for a lesion type is the highest
    score of its predicted lesions of that type (0 when there are none).
    Scores of the two kinds should not be mixed in one summary.

Summary over a site's validation cases, per lesion type ``X``
-----------------------------------------------------------
``lesion-sens-X``
    Lesion sensitivity: found reference lesions / all reference lesions
    (reported only when some case has a reference lesion).
``fp-lesions-X``
    False-positive lesions per case: their mean count over all cases.
``detect-sens-X``
    Case-level detection sensitivity: the share of cases whose reference has
    the lesion type in which the model predicts any lesion of it (reported
    only when such cases exist).
``detect-spec-X``
    Case-level specificity: the share of cases without the lesion type in
    which the model predicts none (reported only when such cases exist).
``detect-auc-X``
    Area under the ROC curve of the case score as a test for "this case has
    the lesion type" (reported only when cases with and without it exist;
    tied scores count one half).
``froc-X``
    FROC summary: the mean lesion sensitivity at 0.125, 0.25, 0.5, 1, 2, 4 and
    8 false-positive lesions per case, obtained by raising a threshold on the
    predicted lesions' scores (reported only when some case has a reference
    lesion). Sensitivity is interpolated linearly between operating points
    and held at its last value beyond the highest false-positive rate the
    model reaches (the CAMELYON16 convention, as MONAI computes it). The
    threshold is applied to each found lesion's best score, so a lesion found
    by several predicted lesions counts until the last of them is removed.

Every value is finite; all but ``fp-lesions-X`` lie in [0, 1].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LESION_REGIONS: dict[str, tuple[int, ...]] = {"tumour": (2,), "cyst": (3,)}

# Share of a reference lesion's voxels the prediction must cover to find it.
MIN_OVERLAP = 0.1

# False-positive lesions per case at which the FROC sensitivity is averaged.
FROC_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class LesionCase:
    """One case's lesions of one lesion type (see the module docstring).

    Attributes
    ----------
    has_ref : bool
        The reference contains the lesion type.
    n_ref : int
        Reference lesions.
    n_found : int
        Reference lesions found.
    found_scores : tuple of float
        One per reference lesion: the highest score of the predicted lesions
        that find it, 0.0 when it is missed.
    fp_scores : tuple of float
        One per false-positive predicted lesion: its score.
    case_score : float
        The highest score of any predicted lesion of the type; 0.0 when none.
    """

    has_ref: bool
    n_ref: int
    n_found: int
    found_scores: tuple[float, ...]
    fp_scores: tuple[float, ...]
    case_score: float


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask, with full connectivity.

    Voxels sharing a face, an edge or a corner are connected (26-connectivity
    in 3D): at coarse spacing a lesion's voxels are often joined only
    diagonally, and splitting it there would count one lesion as two.

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean (or 0/1) array, usually 3D.

    Returns
    -------
    labelled : numpy.ndarray
        Integer array of ``mask``'s shape: 0 outside, 1..n per component.
    n : int
        Number of components.
    """
    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    labelled, n = ndimage.label(mask, structure=structure)
    return labelled, int(n)


def _component_scores(
    labelled: np.ndarray, n: int, prob: np.ndarray | None
) -> np.ndarray:
    """Scores indexed by component (entry 0 unused): max probability or size."""
    if prob is None:
        return np.bincount(labelled.ravel(), minlength=n + 1).astype(float)
    scores = np.zeros(n + 1)
    if n:
        # over the components' voxels only (scipy's maximum sorts the volume)
        inside = labelled > 0
        np.maximum.at(scores, labelled[inside], np.asarray(prob, dtype=float)[inside])
    return scores


def _region_lesions(
    pred: np.ndarray, true: np.ndarray, prob: np.ndarray | None, min_overlap: float
) -> LesionCase:
    """:class:`LesionCase` of one region, from its boolean masks."""
    ref, n_ref = components(true)
    hyp, n_hyp = components(pred)
    scores = _component_scores(hyp, n_hyp, prob)

    both = true & pred
    size = np.bincount(ref.ravel(), minlength=n_ref + 1)
    covered = np.bincount(ref[both], minlength=n_ref + 1)
    # a quotient is correctly rounded, so a share of exactly min_overlap counts
    found = covered[1:] / np.maximum(size[1:], 1) >= min_overlap
    # best score among the predicted components overlapping each reference one
    best = np.zeros(n_ref + 1)
    np.maximum.at(best, ref[both], scores[hyp[both]])
    found_scores = tuple(float(s) for s in np.where(found, best[1:], 0.0))

    touched = np.zeros(n_hyp + 1, dtype=bool)
    touched[hyp[both]] = True
    fp_scores = tuple(float(scores[c]) for c in range(1, n_hyp + 1) if not touched[c])
    return LesionCase(
        has_ref=n_ref > 0,
        n_ref=n_ref,
        n_found=int(found.sum()),
        found_scores=found_scores,
        fp_scores=fp_scores,
        case_score=float(scores[1:].max()) if n_hyp else 0.0,
    )


def case_lesions(
    pred: np.ndarray,
    true: np.ndarray,
    prob: Mapping[str, np.ndarray] | None = None,
    regions: Mapping[str, tuple[int, ...]] = LESION_REGIONS,
    min_overlap: float = MIN_OVERLAP,
) -> dict[str, LesionCase]:
    """Lesions of one case, per lesion type.

    Parameters
    ----------
    pred, true : numpy.ndarray
        Integer label maps of one case (predicted, reference), same shape.
    prob : mapping of str to numpy.ndarray, optional
        Probability map per region name, of the label maps' shape. A region
        with a map scores its predicted lesions by their highest probability;
        one without by their size in voxels.
    regions : mapping of str to tuple of int
        Lesion types and their label values.
    min_overlap : float
        Share of a reference lesion's voxels the prediction must cover for
        the lesion to be found.

    Returns
    -------
    dict of str to LesionCase
        One entry per region, in ``regions``' order.

    Raises
    ------
    ValueError
        If shapes differ or ``min_overlap`` is not in (0, 1].
    """
    pred, true = np.asarray(pred), np.asarray(true)
    if pred.shape != true.shape:
        raise ValueError(f"pred {pred.shape} and true {true.shape} differ in shape")
    if not 0.0 < min_overlap <= 1.0:
        raise ValueError(f"min_overlap must be in (0, 1], got {min_overlap}")
    out = {}
    for name, values in regions.items():
        region_prob = None if prob is None else prob.get(name)
        if region_prob is not None and np.shape(region_prob) != pred.shape:
            raise ValueError(
                f"probability map of {name!r} has shape {np.shape(region_prob)}, "
                f"the label maps {pred.shape}"
            )
        out[name] = _region_lesions(
            np.isin(pred, values), np.isin(true, values), region_prob, min_overlap
        )
    return out


def _auc(scores: list[float], positive: list[bool]) -> float:
    """ROC AUC of ``scores`` for ``positive`` (MONAI; ties count one half)."""
    import torch
    from monai.metrics import compute_roc_auc

    y_pred = torch.tensor(scores, dtype=torch.float64)
    y = torch.tensor([float(p) for p in positive], dtype=torch.float64)
    return float(compute_roc_auc(y_pred, y))


def _froc(found: list[float], fps: list[float], n_cases: int) -> float:
    """Mean lesion sensitivity at FROC_RATES false positives per case."""
    from monai.metrics import compute_froc_curve_data, compute_froc_score

    # MONAI never uses the lowest score as a threshold, taking it for the 0
    # given to missed lesions; a 0 among the false positives makes that so
    # even when every lesion was found (and it counts at no threshold above 0).
    fp_probs = np.asarray([0.0, *fps], dtype=float)
    tp_probs = np.asarray(found, dtype=float)
    fps_per_case, sensitivity = compute_froc_curve_data(
        fp_probs, tp_probs, num_targets=len(found), num_images=n_cases
    )
    return float(compute_froc_score(fps_per_case, sensitivity, FROC_RATES))


def summarise_lesions(cases: Iterable[Mapping[str, LesionCase]]) -> dict[str, float]:
    """Lesion-level summary over a site's validation cases.

    Parameters
    ----------
    cases : iterable of mapping of str to LesionCase
        :func:`case_lesions` of each case; every case must have the same
        regions.

    Returns
    -------
    dict of str to float
        Per region ``X``: ``lesion-sens-X``, ``fp-lesions-X``,
        ``detect-sens-X``, ``detect-spec-X``, ``detect-auc-X``, ``froc-X``,
        each left out when its denominator is empty (see the module
        docstring). Empty when there are no cases.
    """
    cases = list(cases)
    out: dict[str, float] = {}
    if not cases:
        return out
    for name in cases[0]:
        rows = [c[name] for c in cases]
        found = [s for r in rows for s in r.found_scores]
        fps = [s for r in rows for s in r.fp_scores]
        with_ref = [r for r in rows if r.has_ref]
        without = [r for r in rows if not r.has_ref]
        if found:
            n_found = sum(r.n_found for r in rows)
            out[f"lesion-sens-{name}"] = n_found / sum(r.n_ref for r in rows)
        out[f"fp-lesions-{name}"] = len(fps) / len(rows)
        if with_ref:
            hits = sum(r.case_score > 0 for r in with_ref)
            out[f"detect-sens-{name}"] = hits / len(with_ref)
        if without:
            quiet = sum(r.case_score == 0 for r in without)
            out[f"detect-spec-{name}"] = quiet / len(without)
        if with_ref and without:
            out[f"detect-auc-{name}"] = _auc(
                [r.case_score for r in rows], [r.has_ref for r in rows]
            )
        if found:
            out[f"froc-{name}"] = _froc(found, fps, len(rows))
    return out
