"""The federated preprocessing plan: aggregate dataset fingerprints from every
site, combined by the coordinator into one spacing and intensity window.

A site sends only aggregates over all its cases: the case count, spacing
percentiles per axis, a histogram of foreground intensities on fixed bins that
every site shares, and total label volumes. Never a per-case value. The
coordinator pools the histograms, so the clip window is the percentile of all
foreground voxels of all sites, to within one bin, without any voxel leaving a
site (nnU-Net's fingerprint, computed federatedly).

Every statistic describes at least the site's floor of patients (``floor``,
``privacy.min_cases_for_aggregates``): an order statistic (a quantile, a median
over an odd count) is one patient's value, a histogram bin or a label's total
can be one patient's. So (:func:`site_fingerprint`):

- spacing quantiles and extent medians are *k-anonymous order statistics*
  (:func:`anonymous_quantile`): the mean of the ``floor`` patients' values
  nearest the rank, so one patient moves each by at most the values' range
  divided by ``floor``;
- a histogram bin to which fewer than ``floor`` patients contributed is sent
  as 0 (:func:`anonymous_histogram`);
- a label that fewer than ``floor`` patients have is sent as 0 mL: ``0`` then
  means "fewer than the floor of patients have it", not "none has". The
  coordinator reads no ``label-ml`` (:func:`combine`), and the wire keeps the
  list's fixed length and finite values.

The price: the pooled window loses the sparse tail bins, and the plan's spacing
and patch follow window means rather than exact order statistics; both are
within the spread of the sites' own scans.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from common.shares import capped_shares

HIST_LO, HIST_HI, HIST_BINS = -1024.0, 3072.0, 1024  # 4 HU per bin
EDGES = np.linspace(HIST_LO, HIST_HI, HIST_BINS + 1)
SPACING_QUANTILES = (0.1, 0.5, 0.9)
CLIP_PERCENTILES = (0.5, 99.5)
LABEL_VALUES = (1, 2, 3)


def anonymous_quantile(values: Sequence[float], q: float, k: int) -> float:
    """Quantile ``q`` (0-1) of ``values`` as the mean of ``k`` patients' values.

    The ``k`` consecutive sorted values whose middle is nearest the rank
    ``q * (n - 1)`` (numpy's linear-quantile position), averaged. An exact
    order statistic is one patient's value; this mean is ``k`` patients', and
    changing one patient's value moves it by at most (largest - smallest
    value) / ``k`` (each sorted value shifts at most to its neighbour's, and
    the shifts over the window add up to at most the values' span). ``k = 1``
    is the nearest-rank quantile.

    Raises
    ------
    ValueError
        Fewer than ``k`` values (no statistic over ``k`` patients exists).
    """
    v = np.sort(np.asarray(values, dtype=float))
    n, k = len(v), max(1, int(k))
    if n < k:
        raise ValueError(f"{n} values, fewer than the floor of {k}")
    start = int(np.floor(q * (n - 1) - (k - 1) / 2.0 + 0.5))
    start = min(max(start, 0), n - k)
    return float(v[start : start + k].mean())


def anonymous_histogram(per_patient: np.ndarray, floor: int) -> np.ndarray:
    """Summed counts per bin, with 0 for bins fewer than ``floor`` patients fill.

    Parameters
    ----------
    per_patient : ndarray, shape (patients, bins)
        Each patient's counts.

    Returns
    -------
    ndarray, shape (bins,)
        A released bin is a total over at least ``floor`` patients; a bin only
        a few patients reach (a rare intensity, an implant) would otherwise
        be those patients' voxel counts. Removing a patient from a withheld
        bin changes nothing.
    """
    per_patient = np.asarray(per_patient, dtype=float)
    contributors = (per_patient > 0).sum(axis=0)
    return np.where(contributors >= floor, per_patient.sum(axis=0), 0.0)


def site_fingerprint(
    cases: Iterable[tuple[np.ndarray, np.ndarray, Sequence[float]]],
    floor: int = 1,
) -> dict[str, list[float] | float]:
    """Aggregates of one site's ``(image HU, label, spacing mm)`` cases.

    Parameters
    ----------
    cases : iterable
        One ``(image, label, spacing)`` per patient.
    floor : int
        The fewest patients any statistic may describe (module docstring);
        1 gives nearest-rank quantiles and unfiltered totals.

    Returns
    -------
    dict
        ``n-cases``; ``spacing-q`` (axis-major, the quantiles in
        SPACING_QUANTILES, :func:`anonymous_quantile`); ``extent-mm`` (median
        extent per axis, likewise); ``fg-hist`` (foreground voxel counts per
        bin, values outside the range clipped into the end bins, bins under
        the floor 0); ``label-ml`` (total millilitres of labels 1, 2, 3; 0 for
        a label fewer than ``floor`` patients have).

    Raises
    ------
    ValueError
        Some cases, but fewer than ``floor``.
    """
    spacings, extents, hists = [], [], []
    label_ml = np.zeros(len(LABEL_VALUES))
    label_patients = np.zeros(len(LABEL_VALUES), dtype=int)
    n = 0
    for image, label, spacing in cases:
        n += 1
        spacings.append([float(s) for s in spacing[:3]])
        extents.append(
            [
                n_vox * float(s)
                for n_vox, s in zip(image.shape[:3], spacing[:3], strict=True)
            ]
        )
        fg = image[label > 0]
        hists.append(np.histogram(np.clip(fg, HIST_LO, HIST_HI - 1e-3), bins=EDGES)[0])
        voxel_ml = float(np.prod(spacing[:3])) / 1000.0
        for i, value in enumerate(LABEL_VALUES):
            voxels = int((label == value).sum())
            label_ml[i] += voxels * voxel_ml
            label_patients[i] += voxels > 0
    if 0 < n < floor:
        raise ValueError(f"{n} cases, fewer than the floor of {floor} patients")
    if not n:
        return {
            "n-cases": 0.0,
            "spacing-q": [0.0] * (3 * len(SPACING_QUANTILES)),
            "extent-mm": [0.0] * 3,
            "fg-hist": [0.0] * HIST_BINS,
            "label-ml": [0.0] * len(LABEL_VALUES),
        }
    sp, ext = np.asarray(spacings), np.asarray(extents)
    return {
        "n-cases": float(n),
        "spacing-q": [
            anonymous_quantile(sp[:, a], qq, floor)
            for a in range(3)
            for qq in SPACING_QUANTILES
        ],
        "extent-mm": [anonymous_quantile(ext[:, a], 0.5, floor) for a in range(3)],
        "fg-hist": anonymous_histogram(np.asarray(hists), floor).tolist(),
        "label-ml": np.where(label_patients >= floor, label_ml, 0.0).tolist(),
    }


def hist_percentile(counts: np.ndarray, q: float) -> float:
    """Percentile ``q`` (0-100) of the values a histogram on EDGES counts,
    interpolated linearly inside the bin that holds it."""
    counts = np.asarray(counts, dtype=float)
    total = counts.sum()
    if total <= 0:
        raise ValueError("empty histogram: no foreground voxels at any site")
    cum = np.cumsum(counts)
    target = q / 100.0 * total
    i = int(np.searchsorted(cum, target))
    i = min(i, len(counts) - 1)
    before = cum[i - 1] if i > 0 else 0.0
    frac = (target - before) / counts[i] if counts[i] > 0 else 0.0
    return float(EDGES[i] + frac * (EDGES[i + 1] - EDGES[i]))


def combine(
    fingerprints: Mapping[str, Mapping[str, object]],
    max_patch: Sequence[int] = (128, 128, 128),
    cap: float = 1.0,
) -> dict[str, object]:
    """One preprocessing plan from all sites' fingerprints.

    Target spacing: per axis, the case-weighted median of the sites' median
    spacings (nnU-Net takes the median spacing of the pooled cases). Intensity
    window: pooled foreground percentiles 0.5 and 99.5; mean and std of pooled
    foreground intensities for normalisation (nnU-Net's CT scheme); patch
    size: the median image extent at the target spacing, in multiples of 16,
    at most ``max_patch``.

    A fingerprint is a site's claim, so no site's share of the plan is more
    than ``cap`` (``max-site-weight``, :func:`common.shares.capped_shares`):
    of the case weights of the medians, and of the pooled foreground voxels.
    Where the cap does not bind this is the plain pooling above, to rounding.
    The coordinator has checked every value's range (``common/contract.py``);
    a site without cases weighs nothing.

    Raises
    ------
    ValueError
        No fingerprint, no site with cases, or no foreground voxels at all.
    """
    if not fingerprints:
        raise ValueError("no site sent a fingerprint")
    prints = list(fingerprints.values())
    cases = [float(f["n-cases"]) for f in prints]  # type: ignore[arg-type]
    if not any(n > 0 for n in cases):
        raise ValueError("no site sent a fingerprint of any case")
    weights = np.array(capped_shares(cases, cap))
    hist = _pooled_histogram(prints, cases, cap)
    keep = weights > 0
    medians = np.array(
        [
            [f["spacing-q"][a * len(SPACING_QUANTILES) + 1] for a in range(3)]  # type: ignore[index]
            for f in prints
        ]
    )[keep]
    extents = np.array([f["extent-mm"] for f in prints], float)[keep]
    spacing = [_weighted_median(medians[:, a], weights[keep]) for a in range(3)]
    extent = [_weighted_median(extents[:, a], weights[keep]) for a in range(3)]
    # nnU-Net-style: the patch covers the median image, in multiples of 16 voxels
    # (the U-Nets downsample by 8-16), capped by the plan's largest patch.
    patch = [
        int(max(16, min(cap_, (e / s) // 16 * 16)))
        for e, s, cap_ in zip(extent, spacing, max_patch, strict=True)
    ]
    centres = (EDGES[:-1] + EDGES[1:]) / 2
    mean = float((hist * centres).sum() / hist.sum())
    std = float(np.sqrt((hist * (centres - mean) ** 2).sum() / hist.sum()))
    lo, hi = (hist_percentile(hist, q) for q in CLIP_PERCENTILES)
    return {
        "sites": sorted(fingerprints),
        "cases": int(sum(cases)),
        "spacing-mm": [round(s, 3) for s in spacing],
        "hu-window": [round(lo, 1), round(hi, 1)],
        "patch-size": patch,
        "foreground-mean": round(mean, 2),
        "foreground-std": round(std, 2),
    }


def _pooled_histogram(
    prints: list[Mapping[str, object]], cases: list[float], cap: float
) -> np.ndarray:
    """The sites' foreground histograms pooled, each as its share of all
    foreground voxels, no share above ``cap`` (sites without cases: none).

    Without a binding cap this is the sum of the histograms, divided by the
    total: the same percentiles, mean and std.
    """
    hists = [np.asarray(f["fg-hist"], float) for f in prints]
    voxels = [
        float(h.sum()) if n > 0 else 0.0 for h, n in zip(hists, cases, strict=True)
    ]
    if not any(v > 0 for v in voxels):
        raise ValueError("empty histogram: no foreground voxels at any site")
    shares = capped_shares(voxels, cap)
    parts = [
        share * h / v
        for share, h, v in zip(shares, hists, voxels, strict=True)
        if share > 0
    ]
    return np.sum(parts, axis=0)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2.0)])
