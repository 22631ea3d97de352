"""Synthetic abdominal CT phantoms with kidneys, written in KiTS21/23 layout.

Each case is a CT volume in HU plus a segmentation with the KiTS labels (0 background,
1 kidney, 2 tumour, 3 cyst). Anatomy is built in mm in a patient frame aligned with
RAS+ (+x patient Left, +y Anterior, +z Superior; origin at the body centre between
the kidneys) and then voxelised, so arrays are indexed (x, y, z) and the affine is
``diag(spacing)`` plus an origin. A :class:`SiteProfile` describes one hospital's
scanner and case mix; everything is deterministic given ``(profile, seed, scale)``.
Each tissue's value passes through a :data:`Tone`: HU here, unchanged; T2-like MR
intensities in :mod:`sim.phantoms.mr`, which paints the same anatomy.

``scale`` multiplies the scanner spacing: ``scale=1.0`` gives the native grid, while
:data:`DEFAULT_SCALE` uses a coarser one so that demo training on CPU takes seconds.
The NIfTI header always states the spacing actually written.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from sim.phantoms.profiles import (
    DEFAULT_SCALE,
    FOV_MM,
    TUMOUR_MAX_DIAMETER_MM,
    SiteProfile,
    voxel_spacing,
)

logger = logging.getLogger(__name__)


# A tissue's painted value from its name and its CT value in HU (see anatomy).
Tone = Callable[[str, float], float]


def hounsfield(tissue: str, hu: float) -> float:
    """The CT :data:`Tone`: every tissue keeps its value in HU."""
    return hu


@dataclass(frozen=True, eq=False)  # eq=False: == on array fields would raise
class PhantomCase:
    """One case: float32 ``image`` (HU for CT, arbitrary units for MR) and uint8
    KiTS ``label``, both (X, Y, Z) along RAS+ axes; ``spacing`` in mm along x, y,
    z; ``affine`` voxel-to-RAS (nibabel)."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray


@dataclass(frozen=True)
class _Kidney:
    centre: np.ndarray
    semi: np.ndarray  # semi-axes (lateral width, AP, cranio-caudal length) in mm
    axes: np.ndarray  # columns: world directions of the local axes
    cortex_mm: float
    pyramids: tuple[float, float, float]  # sectors, bands, phase


@dataclass(frozen=True)
class _Lesion:
    centre: np.ndarray
    semi: np.ndarray
    waves: np.ndarray  # (6, 4): wave vector (rad/mm) and phase; 3 lobes, 3 texture
    hu: float
    hu_amp: float
    necrosis_hu: float | None


_Grid = tuple[np.ndarray, np.ndarray, np.ndarray]  # voxel-centre coordinates, mm


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _draw_kidney(rng: np.random.Generator, side: int, z: float) -> _Kidney:
    centre = np.array([side * 72.0, -45.0, z]) + rng.uniform([-5, -4, 0], [5, 4, 0])
    # Length varies less than width so that every kidney stays 10-12 cm long.
    semi = np.array([27.5, 17.5, 56.0]) * rng.uniform(
        [0.9, 0.9, 0.92], [1.1, 1.1, 1.08]
    )
    coronal, sagittal, axial = np.radians(rng.uniform([8, 5, 20], [18, 15, 35]))
    # Upper pole tilts medially and posteriorly; the hilum faces anteromedially.
    long_axis = _unit(np.array([-side * math.tan(coronal), -math.tan(sagittal), 1.0]))
    lateral = np.array([side * math.cos(axial), -math.sin(axial), 0.0])
    lateral = _unit(lateral - lateral.dot(long_axis) * long_axis)
    axes = np.column_stack([lateral, np.cross(long_axis, lateral), long_axis])
    pyramids = (
        float(rng.integers(5, 8)),
        float(rng.integers(2, 4)),
        rng.uniform(0, 2 * math.pi),
    )
    return _Kidney(centre, semi, axes, rng.uniform(5.0, 8.0), pyramids)


def _draw_lesion(
    rng: np.random.Generator,
    kidney: _Kidney,
    radius: float,
    depth: tuple[float, float],
    hu: float,
    hu_amp: float = 0.0,
    necrosis_hu: float | None = None,
) -> _Lesion:
    for _ in range(64):  # hilar (medial) sites are rare and would hit the spine
        u = _unit(rng.standard_normal(3))
        if u[0] > -0.3:
            break
    surface = kidney.centre + kidney.axes @ (kidney.semi * u)
    normal = _unit(kidney.axes @ (u / kidney.semi))
    centre = surface + normal * radius * rng.uniform(*depth)
    semi = radius * rng.uniform(0.85, 1.15, size=3)
    # Plane waves of 10-25 mm wavelength give lobulation and texture at a realistic
    # scale without a costly 3-D noise field.
    k = rng.standard_normal((6, 3))
    k *= (2 * math.pi / rng.uniform(10, 25, 6) / np.linalg.norm(k, axis=1))[:, None]
    waves = np.column_stack([k, rng.uniform(0, 2 * math.pi, 6)])
    return _Lesion(centre, semi, waves, hu, hu_amp, necrosis_hu)


def _block(
    grid: _Grid, centre: np.ndarray, radius: float
) -> tuple[tuple[slice, ...], list[np.ndarray]] | None:
    """Sub-grid within ``radius`` of ``centre``: slices and broadcastable offsets."""
    slices, offsets = [], []
    for axis, coords in enumerate(grid):
        lo = int(np.searchsorted(coords, centre[axis] - radius, "left"))
        hi = int(np.searchsorted(coords, centre[axis] + radius, "right"))
        if lo >= hi:
            return None
        shape = [1, 1, 1]
        shape[axis] = hi - lo
        slices.append(slice(lo, hi))
        offsets.append((coords[lo:hi] - centre[axis]).reshape(shape))
    return tuple(slices), offsets


def _paint_ellipsoid(
    img: np.ndarray,
    grid: _Grid,
    centre: np.ndarray,
    semi: np.ndarray,
    hu: float,
    within: np.ndarray,
) -> None:
    if (blk := _block(grid, centre, float(max(semi)))) is not None:
        sl, d = blk
        mask = sum((di / si) ** 2 for di, si in zip(d, semi, strict=True)) <= 1.0
        img[sl][mask & within[sl[0], sl[1]][..., None]] = hu


def _render_kidney(
    img: np.ndarray,
    lab: np.ndarray,
    grid: _Grid,
    k: _Kidney,
    cortex_hu: float,
    medulla_hu: float,
) -> None:
    if (blk := _block(grid, k.centre, float(k.semi.max()))) is None:
        return
    sl, d = blk
    q = [
        d[0] * k.axes[0, i] + d[1] * k.axes[1, i] + d[2] * k.axes[2, i]
        for i in range(3)
    ]
    kidney = sum((qi / si) ** 2 for qi, si in zip(q, k.semi, strict=True)) <= 1.0
    inner = (
        sum((qi / (si - k.cortex_mm)) ** 2 for qi, si in zip(q, k.semi, strict=True))
        <= 1.0
    )
    # Pyramids are sectors around the long axis and bands along it, separated by
    # cortical columns, which gives the corticomedullary phase its pattern.
    sectors, bands, phase = k.pyramids
    pyramid = (np.cos(sectors * np.arctan2(q[1], q[0]) + phase) > -0.3) & (
        np.cos(math.pi * bands * q[2] / k.semi[2] + phase) > -0.5
    )
    hu = np.where(inner & pyramid, np.float32(medulla_hu), np.float32(cortex_hu))
    img[sl][kidney] = hu[kidney]
    lab[sl][kidney] = 1


def _render_lesion(
    img: np.ndarray,
    lab: np.ndarray,
    grid: _Grid,
    les: _Lesion,
    label: int,
    within: np.ndarray,
) -> None:
    if (blk := _block(grid, les.centre, float(les.semi.max()) * 1.15)) is None:
        return
    sl, d = blk

    def field(waves: np.ndarray) -> np.ndarray:
        return sum(
            np.cos(w[0] * d[0] + w[1] * d[1] + w[2] * d[2] + w[3]) for w in waves
        ) / len(waves)

    rho = np.sqrt(sum((di / si) ** 2 for di, si in zip(d, les.semi, strict=True)))
    # Masses displace rather than pierce the abdominal wall, so clip to the cavity.
    mask = (rho <= 1.0 + 0.12 * field(les.waves[:3])) & within[sl[0], sl[1]][..., None]
    tex = field(les.waves[3:])
    hu = les.hu + les.hu_amp * tex
    if les.necrosis_hu is not None:
        hu = np.where(rho < 0.45 + 0.1 * tex, les.necrosis_hu, hu)
    img[sl][mask] = np.broadcast_to(hu, mask.shape)[mask]
    lab[sl][mask] = label
    # A lesion smaller than a coarse voxel must still occupy one, or a case drawn
    # with a tumour would carry no tumour label.
    idx = tuple(
        int(round((c - ax[0]) / (ax[1] - ax[0]))) if ax.size > 1 else 0
        for c, ax in zip(les.centre, grid, strict=True)
    )
    if all(0 <= i < ax.size for i, ax in zip(idx, grid, strict=True)):
        img[idx], lab[idx] = les.hu, label


def _render_spine(
    img: np.ndarray,
    grid: _Grid,
    body: np.ndarray,
    disc_phase: float,
    tone: Tone = hounsfield,
) -> None:
    """Vertebral bodies with a cortical rim, discs every 32 mm, posterior arch."""
    if (blk := _block(grid, np.array([0.0, -70.0, 0.0]), 45.0)) is None:
        return
    (sx, sy, _), (dx, dy, _) = blk
    x2, y2 = dx[:, :, 0], dy[:, :, 0] - 70.0
    vb = (x2 / 24.0) ** 2 + ((y2 + 50.0) / 20.0) ** 2
    canal = np.hypot(x2, y2 + 83.0)
    arch = (canal <= 15.0) | ((np.abs(x2) <= 5.0) & (y2 <= -83.0) & (y2 >= -108.0))
    arch |= (np.abs(x2) <= 42.0) & (np.abs(y2 + 70.0) <= 3.0)  # transverse processes
    arch &= body[sx, sy]
    disc = ((grid[2] + disc_phase) % 32.0) < 7.0
    block = img[sx, sy]
    block[arch & (vb > 1.0)] = tone("bone", 450.0)
    block[vb <= 1.0] = tone("marrow", 220.0)
    block[(vb <= 1.0) & (vb > 0.85**2)] = tone("cortical-bone", 600.0)
    # At disc levels: a soft disc in the body and ligaments instead of the arch.
    block[(vb <= 1.0)[..., None] & disc] = tone("disc", 90.0)
    block[(arch & (vb > 1.0))[..., None] & disc] = tone("ligament", 45.0)
    block[canal <= 9.0] = tone("csf", 15.0)


def generate_case(
    profile: SiteProfile, seed: int, scale: float = DEFAULT_SCALE
) -> PhantomCase:
    """Generate one synthetic abdominal case (CT, or MR for an MR profile).

    Parameters
    ----------
    profile : SiteProfile
        Scanner and case mix of the site; an MR profile (``modality: MR``) gets
        :func:`sim.phantoms.mr.mr_image` over the same anatomy in T2 tones.
    seed : int
        Non-negative case seed, mixed with a stable digest of ``profile.name``.
    scale : float
        Multiplier on the scanner spacing (1.0 = native). Only the voxelisation
        depends on it, not the anatomy.

    Returns
    -------
    PhantomCase
        Image (float32 HU; MR: arbitrary units), label (uint8 KiTS labels),
        spacing and RAS affine.
    """
    if profile.modality == "MR":
        from sim.phantoms.mr import mr_image, t2  # mr imports nothing of this module

        vol = anatomy(profile, seed, scale, tone=t2)
        return PhantomCase(mr_image(vol, profile), vol.label, vol.spacing, vol.affine)
    vol = anatomy(profile, seed, scale)
    img = vol.image
    noise = np.random.default_rng(vol.noise_seq).standard_normal(img.shape, np.float32)
    noise *= np.float32(profile.noise_hu)
    img += noise + np.float32(profile.intensity_offset_hu)
    np.clip(img, -1024.0, 3071.0, out=img)
    return PhantomCase(img, vol.label, vol.spacing, vol.affine)


@dataclass(frozen=True, eq=False)
class Anatomy:
    """A case before its scanner: noise-free ``image`` (values from the tone),
    ``label``, ``spacing``, ``affine``, the voxel-centre coordinates ``grid``
    (mm, per axis) and the seed of the scanner's own randomness."""

    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    grid: _Grid
    noise_seq: np.random.SeedSequence


def anatomy(
    profile: SiteProfile,
    seed: int,
    scale: float = DEFAULT_SCALE,
    tone: Tone = hounsfield,
) -> Anatomy:
    """Draw and paint one patient, each tissue's value through ``tone``.

    Every anatomical draw comes from ``(seed, profile.name)`` before rendering,
    whatever the tone, so a tone changes the intensities, never the anatomy.
    """
    spacing = voxel_spacing(profile, scale)
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    # Python's hash() is salted per process; a digest keeps runs reproducible.
    name_key = int.from_bytes(hashlib.sha256(profile.name.encode()).digest()[:8], "big")
    anat_seq, noise_seq = np.random.SeedSequence([seed, name_key]).spawn(2)
    rng = np.random.default_rng(anat_seq)
    cm = profile.phase == "corticomedullary"

    # Every anatomical draw happens before rendering, so the anatomy is the same
    # whatever the grid.
    body_a, body_b = 160.0 * rng.uniform(0.95, 1.05), 120.0 * rng.uniform(0.94, 1.06)
    fat_mm = rng.uniform(10.0, 30.0)
    # Liver (patient right, upper FOV) and spleen (left, posterolateral, upper).
    organs = [
        (
            np.array(c) + rng.uniform(-6, 6, 3),
            np.array(s) * rng.uniform(0.9, 1.1, 3),
            rng.uniform(hu - 5, hu + 5),
        )
        for c, s, hu in [
            ((-65, 10, 85), (85, 85, 95), 60),
            ((85, -15, 80), (35, 50, 60), 50),
        ]
    ]
    shift, drop = rng.uniform(-5.0, 5.0), rng.uniform(15.0, 20.0)  # right lies lower
    left = _draw_kidney(rng, +1, shift + drop / 2)
    right = _draw_kidney(rng, -1, shift - drop / 2)
    if cm:
        cortex_hu, medulla_hu = rng.uniform(160, 200), rng.uniform(60, 80)
    else:
        cortex_hu = rng.uniform(125, 145)
        medulla_hu = cortex_hu - rng.uniform(0, 8)
    gas = [
        (rng.uniform([-90, 20, -80], [90, 80, 80]), rng.uniform(8, 20, 3))
        for _ in range(3)
    ]
    disc_phase = rng.uniform(0, 32)

    has_tumour = rng.random() < profile.tumour_prevalence
    t_kidney = left if rng.random() < 0.5 else right
    t_diameter = np.exp(rng.normal(math.log(profile.tumour_median_diameter_mm), 0.4))
    lo, hi = profile.tumour_min_diameter_mm, TUMOUR_MAX_DIAMETER_MM
    t_radius = float(np.clip(t_diameter, lo, hi)) / 2
    t_hu = rng.uniform(120, 170) if cm else rng.uniform(90, 120)
    tumour = _draw_lesion(
        rng,
        t_kidney,
        t_radius,
        (-0.8, 0.3),
        t_hu,
        35.0 if cm else 15.0,
        rng.uniform(20, 35) if t_radius > 22.5 else None,
    )
    necrosis = tumour.necrosis_hu
    tumour = replace(
        tumour,
        hu=tone("tumour", tumour.hu),
        hu_amp=tone("tumour-texture", tumour.hu_amp),
        necrosis_hu=None if necrosis is None else tone("necrosis", necrosis),
    )
    cyst = None
    if rng.random() < profile.cyst_prevalence:
        c_hu = rng.uniform(2.0, 15.0)
        for _ in range(20):  # keep the cyst clear of the tumour
            c_radius = rng.uniform(10.0, 40.0) / 2
            cand = _draw_lesion(
                rng, left if rng.random() < 0.5 else right, c_radius, (-0.5, 0.5), c_hu
            )
            gap = np.linalg.norm(cand.centre - tumour.centre)
            if not has_tumour or gap > 1.15 * (t_radius + c_radius) + 2.0:
                cyst = replace(cand, hu=tone("cyst", cand.hu))
                break

    shape = tuple(max(1, round(f / s)) for s, f in zip(spacing, FOV_MM, strict=True))
    grid: _Grid = tuple(
        (np.arange(n) - (n - 1) / 2.0) * s for s, n in zip(spacing, shape, strict=True)
    )
    img = np.full(shape, tone("air", -1000.0), dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    x2, y2 = grid[0][:, None], grid[1][None, :]
    body = (x2 / body_a) ** 2 + (y2 / body_b) ** 2 <= 1.0
    inner = (x2 / (body_a - fat_mm)) ** 2 + (y2 / (body_b - fat_mm)) ** 2 <= 1.0
    img[body] = tone("fat", -100.0)  # subcutaneous fat
    img[inner] = tone("soft-tissue", 42.0)  # muscle wall and soft tissue
    psoas = ((np.abs(x2) - 35.0) / 18.0) ** 2 + ((y2 + 42.0) / 16.0) ** 2 <= 1.0
    img[psoas] = tone("muscle", 52.0)
    for (c, s, hu), organ in zip(organs, ("liver", "spleen"), strict=True):
        _paint_ellipsoid(img, grid, c, s, tone(organ, hu), inner)
    for k in (left, right):  # perirenal fat separates kidney from liver and spleen
        _paint_ellipsoid(img, grid, k.centre, k.semi + 12.0, tone("fat", -90.0), inner)
    for c, s in gas:  # bowel gas
        _paint_ellipsoid(img, grid, c, s, tone("gas", -950.0), inner)
    aorta = np.hypot(x2 - 12.0, y2 + 22.0) <= 11.0
    img[aorta] = tone("blood", 280.0 if cm else 170.0)
    img[((x2 + 26.0) / 14.0) ** 2 + ((y2 + 18.0) / 10.0) ** 2 <= 1.0] = tone(
        "blood", 110.0 if cm else 150.0
    )  # IVC
    _render_spine(img, grid, body, disc_phase, tone)
    cortex, medulla = tone("cortex", cortex_hu), tone("medulla", medulla_hu)
    for k in (left, right):
        _render_kidney(img, lab, grid, k, cortex, medulla)
    # Tumour goes last: in KiTS the tumour label wins over cyst and kidney.
    if cyst is not None:
        _render_lesion(img, lab, grid, cyst, 3, inner)
    if has_tumour:
        _render_lesion(img, lab, grid, tumour, 2, inner)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [ax[0] for ax in grid]
    return Anatomy(img, lab, spacing, affine, grid, noise_seq)
