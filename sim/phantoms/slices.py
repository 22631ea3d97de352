"""Synthetic kidney CT slices for the classification task: normal, cyst,
tumour, stone.

Each case is one axial slice (a 100 mm square around a kidney) in HU, written
as a single-slice NIfTI, plus a ``manifest.csv`` (``image,label``). The scanner
comes from the same :class:`~sim.phantoms.ct.SiteProfile` as the segmentation
phantoms: in-plane spacing (times ``scale``), noise, HU offset and contrast
phase, and slice thickness, which dims small stones by partial volume. A site's
class mix may be skewed (one hospital sees mostly stones); the class counts
follow the mix exactly (largest remainder) and everything is deterministic given
``(profile, seed, scale, mix)``.

Lesions, with the HU ranges radiologists use:

- cyst: round, sharp, homogeneous water density (0-20 HU);
- tumour: lobulated, often exophytic, heterogeneous, enhancing
  (corticomedullary 110-140 HU +- 40, nephrographic 70-95 HU +- 25, below the
  parenchyma), larger ones with a necrotic centre;
- stone: small (3-8 mm), very bright (700-1800 HU before partial volume, at
  least 600 HU after it), in the renal sinus or a calyx.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import SiteConfig
from sim.phantoms.kits_writer import _atomic_write, _save_nifti, case_seed
from sim.phantoms.profiles import PHANTOM_VERSION, SiteProfile, load_profile

logger = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("normal", "cyst", "tumour", "stone")
DEFAULT_CLS_SCALE = 1.5  # 1.2-1.4 mm pixels: 70-85 pixels across the crop
CROP_MM = 100.0
MANIFEST_NAME, METADATA_NAME, IMAGES_DIR = "manifest.csv", "phantom.json", "images"
_GENERATOR = "kidneyfl.common.phantom_cls"
CLS_PHANTOM_VERSION = 1  # bump when the slices change, so old sites read as stale


@dataclass(frozen=True, eq=False)
class SliceCase:
    """One slice: float32 HU ``image`` (X, Y), its class, spacing and affine."""

    image: np.ndarray
    label: str
    spacing: tuple[float, float, float]
    affine: np.ndarray


def class_counts(n_cases: int, mix: dict[str, float] | None) -> dict[str, int]:
    """Cases per class for ``n_cases`` and relative weights ``mix``.

    Largest-remainder rounding, so the counts sum to ``n_cases`` and follow the
    mix as closely as integers can. ``None`` means equal weights.

    Raises
    ------
    ValueError
        A class not among :data:`CLASSES`, or weights without a positive sum.
    """
    mix = dict(mix) if mix else {c: 1.0 for c in CLASSES}
    unknown = sorted(set(mix) - set(CLASSES))
    if unknown:
        raise ValueError(
            f"class_mix names unknown class(es) {unknown}; phantom classes are "
            f"{', '.join(CLASSES)}"
        )
    total = sum(mix.values())
    if total <= 0 or any(w < 0 for w in mix.values()):
        raise ValueError("class_mix weights must be non-negative with a positive sum")
    exact = {c: n_cases * mix.get(c, 0.0) / total for c in CLASSES}
    counts = {c: int(math.floor(v)) for c, v in exact.items()}
    by_remainder = sorted(CLASSES, key=lambda c: (counts[c] - exact[c], c))
    for c in by_remainder[: n_cases - sum(counts.values())]:
        counts[c] += 1
    return counts


def case_classes(n_cases: int, mix: dict[str, float] | None, seed: int) -> list[str]:
    """The class of each case, in a seeded random order with exact counts."""
    labels = [c for c, k in class_counts(n_cases, mix).items() for _ in range(k)]
    order = np.random.default_rng(np.random.SeedSequence([seed, 0xC1A55])).permutation(
        n_cases
    )
    return [labels[i] for i in order]


def _ellipse(
    x: np.ndarray, y: np.ndarray, c: tuple[float, float], a: float, b: float, t: float
) -> np.ndarray:
    """Normalised radius of (x, y) in an ellipse centred at c, rotated by t."""
    dx, dy = x - c[0], y - c[1]
    u = dx * math.cos(t) + dy * math.sin(t)
    v = -dx * math.sin(t) + dy * math.cos(t)
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)


def generate_slice(
    profile: SiteProfile, label: str, seed: int, scale: float = DEFAULT_CLS_SCALE
) -> SliceCase:
    """One axial slice through a kidney showing ``label``.

    Parameters
    ----------
    profile : SiteProfile
        The site's scanner (spacing, noise, offset, phase, slice thickness).
    label : str
        One of :data:`CLASSES`.
    seed : int
        Non-negative case seed.
    scale : float
        Multiplier on the in-plane spacing (1.0 = the scanner's own).
    """
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; phantom classes: {CLASSES}")
    if seed < 0 or not (math.isfinite(scale) and scale > 0):
        raise ValueError("seed must be non-negative and scale positive")
    rng = np.random.default_rng(np.random.SeedSequence([seed, CLASSES.index(label)]))
    px = round(profile.inplane_spacing_mm * scale, 6)
    n = max(16, round(CROP_MM / px))
    ax = (np.arange(n) - (n - 1) / 2.0) * px
    x, y = np.meshgrid(ax, ax, indexing="ij")
    cm = profile.phase == "corticomedullary"

    img = np.full((n, n), 42.0, dtype=np.float32)  # soft tissue
    # Psoas/quadratus posteriorly, liver or spleen in a corner, bowel gas.
    img[_ellipse(x, y, (rng.uniform(-45, -30), -40), 20, 14, 0.3) <= 1] = 52.0
    organ = (rng.choice([-1, 1]) * 45.0, rng.uniform(25, 45))
    img[_ellipse(x, y, organ, 35, 30, rng.uniform(0, math.pi)) <= 1] = rng.uniform(
        50, 65
    )
    for _ in range(int(rng.integers(0, 3))):
        g = (rng.uniform(-50, 50), rng.uniform(20, 50))
        img[_ellipse(x, y, g, *rng.uniform(4, 9, 2), 0.0) <= 1] = -950.0

    centre = tuple(rng.uniform(-8, 8, 2))
    a, b, theta = rng.uniform(25, 31), rng.uniform(15, 20), rng.uniform(-0.6, 0.6)
    img[_ellipse(x, y, centre, a + 10, b + 10, theta) <= 1] = -90.0  # perirenal fat
    r = _ellipse(x, y, centre, a, b, theta)
    cortex = rng.uniform(160, 200) if cm else rng.uniform(125, 145)
    medulla = rng.uniform(60, 80) if cm else cortex - rng.uniform(0, 8)
    cortex_mm = rng.uniform(5, 8)
    img[r <= 1] = cortex
    img[r <= 1 - cortex_mm / b] = medulla
    # Renal sinus fat at the hilum (medial side of the ellipse).
    hilum = (
        centre[0] - 0.55 * a * math.cos(theta),
        centre[1] - 0.55 * a * math.sin(theta),
    )
    img[(_ellipse(x, y, hilum, 9, 5, theta) <= 1) & (r <= 1)] = -80.0

    def on_kidney(depth: float) -> tuple[float, float]:
        ang = rng.uniform(0, 2 * math.pi)
        rr = depth
        u, v = a * rr * math.cos(ang), b * rr * math.sin(ang)
        return (
            centre[0] + u * math.cos(theta) - v * math.sin(theta),
            centre[1] + u * math.sin(theta) + v * math.cos(theta),
        )

    if label == "cyst":
        rad = rng.uniform(7, 18)
        c = on_kidney(rng.uniform(0.4, 1.0))
        img[_ellipse(x, y, c, rad, rad * rng.uniform(0.9, 1.1), 0) <= 1] = rng.uniform(
            0, 20
        )
    elif label == "tumour":
        rad = rng.uniform(12, 26)
        c = on_kidney(rng.uniform(0.5, 1.1))  # often exophytic: bulges the contour
        k = rng.standard_normal((4, 2)) * (2 * math.pi / rng.uniform(8, 20))
        ph = rng.uniform(0, 2 * math.pi, 4)
        waves = [np.cos(k[i, 0] * x + k[i, 1] * y + ph[i]) for i in range(4)]
        lob = 1.0 + 0.15 * (waves[0] + waves[1]) / 2
        tex = (waves[2] + waves[3]) / 2
        rho = _ellipse(x, y, c, rad, rad * rng.uniform(0.8, 1.2), 0)
        # Heterogeneous; in the nephrographic phase less enhancing than the
        # parenchyma around it, in the corticomedullary phase between cortex
        # and medulla with a wide spread.
        if cm:
            hu = rng.uniform(110, 140) + 40 * tex
        else:
            hu = rng.uniform(70, 95) + 25 * tex
        mask = rho <= lob
        img[mask] = hu[mask]
        if rad > 14:  # necrotic centre
            img[mask & (rho < 0.45 + 0.1 * tex)] = rng.uniform(15, 35)
    elif label == "stone":
        diam = rng.uniform(3, 8)
        hu = rng.uniform(700, 1800)
        # Partial volume with a thick slice dilutes a small stone, never below
        # 600 HU, so over 300 HU after any profile offset, noise and blur.
        hu = max(
            600.0, 40.0 + (hu - 40.0) * min(1.0, diam / profile.slice_thickness_mm)
        )
        c = hilum if rng.random() < 0.5 else on_kidney(rng.uniform(0.2, 0.6))
        rad = max(diam / 2, 0.5 * px)  # at least one pixel
        img[np.hypot(x - c[0], y - c[1]) <= rad] = hu
        ci = (int(np.argmin(np.abs(ax - c[0]))), int(np.argmin(np.abs(ax - c[1]))))
        img[ci] = hu

    noise = np.random.default_rng(np.random.SeedSequence([seed, 7])).standard_normal(
        (n, n), np.float32
    )
    img += noise * np.float32(profile.noise_hu) + np.float32(
        profile.intensity_offset_hu
    )
    np.clip(img, -1024.0, 3071.0, out=img)
    spacing = (px, px, float(profile.slice_thickness_mm))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [ax[0], ax[0], 0.0]
    return SliceCase(img, label, spacing, affine)


def write_cls_site(
    out_dir: Path,
    profile: SiteProfile,
    n_cases: int,
    class_mix: dict[str, float] | None = None,
    seed: int = 0,
    scale: float = DEFAULT_CLS_SCALE,
    overwrite: bool = False,
) -> Path:
    """Write ``n_cases`` classification slices and ``manifest.csv``.

    Layout: ``out_dir/images/case_00000.nii.gz`` ..., ``out_dir/manifest.csv``
    (``image,label``, paths relative to ``out_dir``) and ``phantom.json``. A
    rerun with the same settings keeps what is there.

    Returns
    -------
    Path
        The manifest.

    Raises
    ------
    FileExistsError
        ``out_dir`` holds a manifest not written here, or phantoms made with
        other settings and ``overwrite`` is False.
    ValueError
        Fewer than one case, or an MR profile (the slices are CT).
    """
    if n_cases < 1:
        raise ValueError(f"n_cases must be at least 1, got {n_cases}")
    if profile.modality != "CT":
        raise ValueError(
            f"profile {profile.name} is {profile.modality}: classification "
            "phantoms are CT slices only; choose a CT profile"
        )
    out_dir = Path(out_dir)
    labels = case_classes(n_cases, class_mix, seed)
    meta: dict[str, Any] = {
        "generator": _GENERATOR,
        "phantom_version": PHANTOM_VERSION,
        "cls_phantom_version": CLS_PHANTOM_VERSION,
        "profile": profile.model_dump(),
        "seed": int(seed),
        "scale": float(scale),
        "n_cases": n_cases,
        "class_counts": class_counts(n_cases, class_mix),
    }
    names = [f"{IMAGES_DIR}/case_{i:05d}.nii.gz" for i in range(n_cases)]
    manifest, meta_path = out_dir / MANIFEST_NAME, out_dir / METADATA_NAME
    try:
        existing = json.loads(meta_path.read_text())
    except FileNotFoundError:
        existing = None
    except (OSError, ValueError):
        existing = {}
    if existing == meta and manifest.is_file():
        todo = [i for i in range(n_cases) if not (out_dir / names[i]).is_file()]
    else:
        ours = isinstance(existing, dict) and existing.get("generator") == _GENERATOR
        foreign = manifest.exists() or any((out_dir / IMAGES_DIR).glob("*"))
        if foreign and not ours:
            raise FileExistsError(
                f"{out_dir} holds a manifest or images not written by the phantom "
                "generator; choose another directory"
            )
        if existing is not None and not overwrite:
            raise FileExistsError(
                f"{out_dir} holds classification phantoms made with other settings "
                f"(see {METADATA_NAME}); pass overwrite or choose another directory"
            )
        for old in (out_dir / IMAGES_DIR).glob("case_*.nii.gz"):
            old.unlink()
        todo = list(range(n_cases))
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    _atomic_write(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    for i in todo:
        case = generate_slice(profile, labels[i], case_seed(seed, i), scale)
        _save_nifti(out_dir / names[i], case.image[:, :, None], case.affine)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image", "label"])
    writer.writerows(zip(names, labels, strict=True))
    _atomic_write(manifest, buf.getvalue().encode())  # last: marks a complete site
    logger.info(
        "%s: wrote %d of %d slices (profile %s, classes %s)",
        out_dir,
        len(todo),
        n_cases,
        profile.name,
        meta["class_counts"],
    )
    return manifest


def write_cls_site_from_config(site: SiteConfig) -> Path:
    """Write the phantoms a site YAML's ``phantom`` section asks for."""
    ph = site.phantom
    if ph is None:
        raise ValueError(f"{site.source}: no phantom section")
    return write_cls_site(
        site.data.root,
        load_profile(ph.profile),
        ph.cases,
        class_mix=ph.class_mix,
        seed=ph.seed,
        scale=ph.scale or DEFAULT_CLS_SCALE,
        overwrite=True,  # only ever replaces phantoms it wrote (phantom.json)
    )
