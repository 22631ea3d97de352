"""The federated preprocessing plan: aggregate dataset fingerprints from every
site, combined by the coordinator into one spacing and intensity window.

A site sends only aggregates over all its cases: the case count, spacing
percentiles per axis, a histogram of foreground intensities on fixed bins that
every site shares, and total label volumes. Never a per-case value. The
coordinator pools the histograms, so the clip window is the percentile of all
foreground voxels of all sites, to within one bin, without any voxel leaving a
site (nnU-Net's fingerprint, computed federatedly).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

HIST_LO, HIST_HI, HIST_BINS = -1024.0, 3072.0, 1024  # 4 HU per bin
EDGES = np.linspace(HIST_LO, HIST_HI, HIST_BINS + 1)
SPACING_QUANTILES = (0.1, 0.5, 0.9)
CLIP_PERCENTILES = (0.5, 99.5)


def site_fingerprint(
    cases: Iterable[tuple[np.ndarray, np.ndarray, Sequence[float]]],
) -> dict[str, list[float] | float]:
    """Aggregates of one site's ``(image HU, label, spacing mm)`` cases.

    Returns
    -------
    dict
        ``n-cases``; ``spacing-q`` (axis-major, the quantiles in
        SPACING_QUANTILES); ``fg-hist`` (foreground voxel counts per bin, values
        outside the range clipped into the end bins); ``label-ml`` (total
        millilitres of labels 1, 2, 3).
    """
    spacings, extents, hist = [], [], np.zeros(HIST_BINS)
    label_ml = np.zeros(3)
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
        hist += np.histogram(np.clip(fg, HIST_LO, HIST_HI - 1e-3), bins=EDGES)[0]
        voxel_ml = float(np.prod(spacing[:3])) / 1000.0
        for i, value in enumerate((1, 2, 3)):
            label_ml[i] += float((label == value).sum()) * voxel_ml
    sp = np.asarray(spacings) if spacings else np.zeros((0, 3))
    q = [
        float(np.quantile(sp[:, a], qq)) if n else 0.0
        for a in range(3)
        for qq in SPACING_QUANTILES
    ]
    ext = [float(np.median(np.asarray(extents)[:, a])) if n else 0.0 for a in range(3)]
    return {
        "n-cases": float(n),
        "spacing-q": q,
        "extent-mm": ext,
        "fg-hist": hist.tolist(),
        "label-ml": label_ml.tolist(),
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
) -> dict[str, object]:
    """One preprocessing plan from all sites' fingerprints.

    Target spacing: per axis, the case-weighted median of the sites' median
    spacings (nnU-Net takes the median spacing of the pooled cases). Intensity
    window: pooled foreground percentiles 0.5 and 99.5; mean and std of pooled
    foreground intensities for normalisation (nnU-Net's CT scheme); patch
    size: the median image extent at the target spacing, in multiples of 16,
    at most ``max_patch``.
    """
    if not fingerprints:
        raise ValueError("no site sent a fingerprint")
    hist = np.sum(
        [np.asarray(f["fg-hist"], float) for f in fingerprints.values()], axis=0
    )
    weights = np.array([float(f["n-cases"]) for f in fingerprints.values()])
    medians = np.array(
        [
            [f["spacing-q"][a * len(SPACING_QUANTILES) + 1] for a in range(3)]
            for f in fingerprints.values()
        ]
    )
    spacing = [_weighted_median(medians[:, a], weights) for a in range(3)]
    extents = np.array([f["extent-mm"] for f in fingerprints.values()], float)
    extent = [_weighted_median(extents[:, a], weights) for a in range(3)]
    # nnU-Net-style: the patch covers the median image, in multiples of 16 voxels
    # (the U-Nets downsample by 8-16), capped by the plan's largest patch.
    patch = [
        int(max(16, min(cap, (e / s) // 16 * 16)))
        for e, s, cap in zip(extent, spacing, max_patch, strict=True)
    ]
    centres = (EDGES[:-1] + EDGES[1:]) / 2
    mean = float((hist * centres).sum() / hist.sum())
    std = float(np.sqrt((hist * (centres - mean) ** 2).sum() / hist.sum()))
    lo, hi = (hist_percentile(hist, q) for q in CLIP_PERCENTILES)
    return {
        "sites": sorted(fingerprints),
        "cases": int(weights.sum()),
        "spacing-mm": [round(s, 3) for s in spacing],
        "hu-window": [round(lo, 1), round(hi, 1)],
        "patch-size": patch,
        "foreground-mean": round(mean, 2),
        "foreground-std": round(std, 2),
    }


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2.0)])
