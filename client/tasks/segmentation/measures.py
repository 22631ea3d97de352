"""Surgical-planning measures of each kidney and tumour, from a KiTS label map.

Everything is measured in the scan's own grid and spacing (the label map as
prediction writes it), and every position in world coordinates through the
scan's affine, so a scan stored LPS, flipped or permuted gives the same answer.
The world frame is NIfTI's (nibabel's) RAS+: +x points to the patient's
**right**, +y anterior, +z superior. (DICOM's LPS frame is the one whose +x
points to the patient's left; NIfTI negates its x and y.)

The measures follow the R.E.N.A.L. nephrometry score's ingredients as far as
KiTS labels (0 background, 1 kidney, 2 tumour, 3 cyst) allow: size (R),
exophytic share (E), nearness to the renal sinus (N, estimated), and polar
location (L, estimated); see :func:`tumour_measures` for what each stands in
for. They describe a segmentation, not a patient: a clinician checks them
against the images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError, cKDTree
from scipy.spatial.distance import pdist

from common.lesions import components

log = logging.getLogger(__name__)

KIDNEY, TUMOUR, CYST = 1, 2, 3
# Radius of the ball that closes a kidney's outline (sinus estimate).
OUTLINE_CLOSING_MM = 5.0
# A second kidney-labelled component counts as a kidney when its parenchyma is
# at least this share of the largest one's (smaller ones are fragments).
MIN_KIDNEY_SHARE = 0.2
MAX_KIDNEYS = 2
# Smallest renal-sinus estimate believed, in mL (smaller: none found).
MIN_SINUS_ML = 0.5
# Lines of voxels tested against the hull's facets at a time (memory bound).
CHUNK = 512


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis (the affine's column norms)."""
    return np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0))


def to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """World (RAS+ mm) coordinates of voxel indices ``ijk`` of shape (N, 3)."""
    a = np.asarray(affine, float)
    return np.asarray(ijk, float) @ a[:3, :3].T + a[:3, 3]


def side_of(x_world: float, midline_x: float) -> str:
    """``"right"`` or ``"left"``: RAS+ x grows towards the patient's right."""
    return "right" if x_world > midline_x else "left"


def max_diameter_mm(points: np.ndarray) -> float:
    """Largest distance between two of ``points`` (N, 3 world mm).

    Only the convex hull's vertices can realise it, so with four or more
    non-coplanar points only those are compared.
    """
    if len(points) < 2:
        return 0.0
    if len(points) >= 4:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # coplanar or collinear: compare them all
            pass
    return float(pdist(points).max())


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _closed(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Morphological closing by a ball of ``radius_mm`` (exact, via distance
    transforms, so anisotropic voxels get a true ball), then holes filled."""
    pad = [int(np.ceil(radius_mm / s)) + 1 for s in spacing]
    m = np.pad(mask, [(p, p) for p in pad])
    dilated = ndimage.distance_transform_edt(~m, sampling=spacing) <= radius_mm
    closed = ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm
    closed = ndimage.binary_fill_holes(closed)
    return closed[tuple(slice(p, p + n) for p, n in zip(pad, mask.shape, strict=True))]


def _inside_hull(mask: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Voxels whose centres lie in the convex hull of ``mask``'s voxel centres
    (index space: hull membership does not depend on the affine).

    Each line of voxels along the last axis meets the hull in one interval,
    bounded by the facets' half-spaces: lines x facets, never voxels x facets.
    """
    pts = np.argwhere(_boundary(mask))
    try:
        eq = ConvexHull(pts).equations  # n . x + c <= 0 inside, |n| = 1
    except (QhullError, ValueError):  # flat or tiny: the mask is its own hull
        return mask.copy()
    lo, hi = pts.min(0), pts.max(0) + 1
    ii, jj = np.meshgrid(
        np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij"
    )
    lines = np.column_stack([ii.ravel(), jj.ravel()]).astype(float)
    up, down = eq[:, 2] > tol, eq[:, 2] < -tol
    k_lo = np.empty(len(lines))
    k_hi = np.empty(len(lines))
    for start in range(0, len(lines), CHUNK):  # bounded memory: CHUNK x facets
        rhs = -(lines[start : start + CHUNK] @ eq[:, :2].T + eq[:, 3])
        bound = rhs / np.where(up | down, eq[:, 2], 1.0)
        flat_ok = np.all(rhs[:, ~(up | down)] >= -tol, axis=1)
        k_hi[start : start + CHUNK] = np.where(
            flat_ok, bound[:, up].min(1, initial=np.inf), -np.inf
        )
        k_lo[start : start + CHUNK] = bound[:, down].max(1, initial=-np.inf)
    k_lo = np.ceil(k_lo - tol).reshape(ii.shape)[..., None]
    k_hi = np.floor(k_hi + tol).reshape(ii.shape)[..., None]
    k = np.arange(lo[2], hi[2])
    inside = np.zeros(mask.shape, bool)
    inside[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = (k >= k_lo) & (
        k <= k_hi
    )
    return inside | mask


@dataclass
class _Kidney:
    """One kidney: its kidney+masses component and the derived regions, lazily."""

    comp_id: int
    box: tuple[slice, ...]
    centroid: np.ndarray  # world mm, kidney + masses
    z_extent: tuple[float, float]  # world z of parenchyma + cyst voxels
    parenchyma_voxels: int
    voxels: int
    tree: cKDTree  # boundary voxel centres, world mm
    side: str = ""
    context: dict[str, Any] = field(default_factory=dict)


def _box(slices: tuple[slice, ...], margin: np.ndarray, shape: tuple) -> tuple:
    return tuple(
        slice(max(0, s.start - m), min(n, s.stop + m))
        for s, m, n in zip(slices, margin, shape, strict=True)
    )


def _find_kidneys(labels: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, list]:
    """Kidney+masses components that hold kidney parenchyma: at most two, each
    with at least ``MIN_KIDNEY_SHARE`` of the largest one's parenchyma."""
    comp, _ = components(labels > 0)
    found = []
    for cid, sl in enumerate(ndimage.find_objects(comp), start=1):
        if sl is None:
            continue
        sub = comp[sl] == cid
        lab = labels[sl]
        par = int((sub & (lab == KIDNEY)).sum())
        if par:
            found.append((par, cid, sl, sub, lab))
    found.sort(key=lambda f: -f[0])
    kept = [f for f in found[:MAX_KIDNEYS] if f[0] >= MIN_KIDNEY_SHARE * found[0][0]]
    kidneys = []
    for par, cid, sl, sub, lab in kept:
        off = np.array([s.start for s in sl])
        pc = sub & ((lab == KIDNEY) | (lab == CYST))
        world_pc = to_world(affine, np.argwhere(pc) + off)
        kidneys.append(
            _Kidney(
                comp_id=cid,
                box=sl,
                centroid=to_world(affine, np.argwhere(sub) + off).mean(0),
                z_extent=(float(world_pc[:, 2].min()), float(world_pc[:, 2].max())),
                parenchyma_voxels=par,
                voxels=int(sub.sum()),
                tree=cKDTree(to_world(affine, np.argwhere(_boundary(sub)) + off)),
            )
        )
    if len(found) > len(kidneys):
        log.info("%d small kidney fragment(s) not counted", len(found) - len(kidneys))
    return comp, kidneys


def _midline_x(labels: np.ndarray, affine: np.ndarray, kidneys: list) -> float:
    if len(kidneys) == 2:
        return float((kidneys[0].centroid[0] + kidneys[1].centroid[0]) / 2)
    centre = (np.array(labels.shape[:3], float) - 1) / 2
    return float(to_world(affine, centre[None])[0, 0])


def _context(
    kidney: _Kidney,
    labels: np.ndarray,
    comp: np.ndarray,
    spacing: np.ndarray,
    tumour_box: tuple[slice, ...],
) -> dict[str, Any]:
    """Hull, outline and sinus of ``kidney`` over a box that also holds the
    tumour; cached on the kidney and grown when a later tumour needs more."""
    margin = np.ceil(2 * OUTLINE_CLOSING_MM / spacing).astype(int)
    want = [
        slice(min(a.start, b.start), max(a.stop, b.stop))
        for a, b in zip(kidney.box, tumour_box, strict=True)
    ]
    box = _box(tuple(want), margin, labels.shape)
    ctx = kidney.context
    if ctx and all(
        c.start <= b.start and c.stop >= b.stop
        for c, b in zip(ctx["box"], box, strict=True)
    ):
        return ctx
    lab, own = labels[box], comp[box] == kidney.comp_id
    pc = own & ((lab == KIDNEY) | (lab == CYST))
    hull = _inside_hull(pc)
    outline = _closed(own, OUTLINE_CLOSING_MM, spacing)
    sinus = _sinus(hull & ~outline, spacing)
    dist = (
        ndimage.distance_transform_edt(~sinus, sampling=spacing)
        if sinus is not None
        else None
    )
    kidney.context = {"box": box, "hull": hull, "sinus": sinus, "dist": dist}
    return kidney.context


def _sinus(candidate: np.ndarray, spacing: np.ndarray) -> np.ndarray | None:
    """The largest concavity left once voxel-thin slivers along the hull's
    facets are opened away; ``None`` when it is under ``MIN_SINUS_ML``."""
    r = max(2.0, 1.01 * float(spacing.max()))
    eroded = ndimage.distance_transform_edt(candidate, sampling=spacing) > r
    opened = (ndimage.distance_transform_edt(~eroded, sampling=spacing) <= r) & (
        candidate
    )
    lab, n = components(opened)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] * np.prod(spacing) / 1000.0 < MIN_SINUS_ML:
        return None
    return lab == biggest


def _nearest_kidney(points: np.ndarray, kidneys: list) -> tuple[int, float]:
    dists = [float(k.tree.query(points)[0].min()) for k in kidneys]
    i = int(np.argmin(dists))
    return i, dists[i]


def _polar(z: float, extent: tuple[float, float]) -> str:
    lo, hi = extent
    third = (hi - lo) / 3
    if z >= hi - third:
        return "upper pole"
    if z <= lo + third:
        return "lower pole"
    return "interpolar"


def kidney_measures(labels: np.ndarray, affine: np.ndarray) -> list[dict[str, Any]]:
    """Side and volumes of each kidney (see :func:`tumour_measures` for how
    kidneys and their side are found).

    Returns
    -------
    list of dict
        ``{"side", "volume-ml" (kidney + masses), "parenchyma-ml" (label 1),
        "centroid-ras-mm"}`` per kidney, largest first.
    """
    labels = np.asarray(labels)
    _, kidneys = _find_kidneys(labels, affine)
    midline = _midline_x(labels, affine, kidneys)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000
    return [
        {
            "side": side_of(k.centroid[0], midline),
            "volume-ml": round(k.voxels * voxel_ml, 3),
            "parenchyma-ml": round(k.parenchyma_voxels * voxel_ml, 3),
            "centroid-ras-mm": [round(float(c), 1) for c in k.centroid],
        }
        for k in kidneys
    ]


def tumour_measures(labels: np.ndarray, affine: np.ndarray) -> list[dict[str, Any]]:
    """Planning measures of each tumour component (label 2, 26-connected).

    Kidneys are the kidney+masses components that hold kidney parenchyma (at
    most two; a second must have at least 20 % of the first's parenchyma). A
    tumour belongs to the kidney whose component it is part of, else to the
    nearest kidney (world distance between boundaries).

    Parameters
    ----------
    labels : numpy.ndarray
        KiTS label map (0 background, 1 kidney, 2 tumour, 3 cyst) in the scan's
        grid.
    affine : numpy.ndarray
        The scan's voxel-to-world (RAS+ mm) affine.

    Returns
    -------
    list of dict
        One entry per tumour, largest first:

        ``side``
            ``"left"``/``"right"``: the side of its kidney, whose centroid is
            compared with the midline, the midpoint of the two kidneys'
            centroids when there are two, else the world x of the image's
            centre (CT is reconstructed centred on the patient). RAS+ x grows
            to the patient's right.
        ``volume-ml``
            Voxel count times voxel volume.
        ``max-diameter-mm``
            Largest distance between the centres of two of its boundary
            voxels (convex-hull vertices), in 3D. A radiologist measures edge to
            edge on the images, often in the axial plane (RECIST) or, for
            R.E.N.A.L.'s R, in any plane: centre to centre falls short of
            edge to edge by up to about one voxel, and a 3D maximum can exceed an
            axial one.
        ``polar-location``
            ``"upper pole"``, ``"interpolar"`` or ``"lower pole"``: the
            tumour's centroid z against its kidney's superior-inferior extent
            cut in thirds. R.E.N.A.L.'s L uses the polar lines at the lips of
            the renal hilum, which KiTS labels do not mark; thirds stand in.
        ``exophytic-fraction``
            Share of its voxels outside the kidney's outline, taken as the
            convex hull of the kidney's parenchyma and cysts. A tumour replaces
            the parenchyma it grows in, so the parenchyma alone (even closed
            with a small ball) leaves an open crater where the tumour's
            embedded part lies and would count that part as exophytic; the hull
            bridges the crater along the kidney's convex surface. A tumour in
            the hilar concavity counts as inside (endophytic), as R.E.N.A.L.'s
            E counts sinus tumours; the parenchyma a tumour destroyed entirely
            (a whole pole) cannot be recovered.
        ``distance-to-sinus-mm``
            Distance between voxel centres from the tumour to the renal
            sinus/hilum, estimated as the voxels inside the kidney's convex
            hull but outside its outline (kidney + masses closed with a 5 mm
            ball, holes filled): the hilar concavity. 0 when touching (26-
            neighbours); ``None`` when no concavity of at least 0.5 mL is
            found. An estimate: KiTS labels carry no sinus fat or collecting
            system.
        ``distance-to-kidney-mm``
            0 for a tumour in its kidney's component; for a floating one the
            distance between voxel centres to the nearest kidney voxel, which
            it is then measured against (a prediction far from any kidney is
            more likely a false positive than a renal tumour).
        ``centroid-ras-mm``
            World centroid ``[x, y, z]``.

        ``polar-location``, ``exophytic-fraction``, ``distance-to-sinus-mm``
        and ``distance-to-kidney-mm`` are ``None`` when the scan has no
        kidney; ``side`` then compares the tumour's own centroid with the
        image's centre.
    """
    labels = np.asarray(labels)
    affine = np.asarray(affine, float)
    spacing = voxel_sizes(affine)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    comp, kidneys = _find_kidneys(labels, affine)
    midline = _midline_x(labels, affine, kidneys)
    for k in kidneys:
        k.side = side_of(k.centroid[0], midline)
    tlab, _ = components(labels == TUMOUR)
    touch = float(np.linalg.norm(spacing)) + 1e-6
    out = []
    for tid, sl in enumerate(ndimage.find_objects(tlab), start=1):
        if sl is None:
            continue
        mask, offset = tlab[sl] == tid, np.array([s.start for s in sl])
        ijk = np.argwhere(mask) + offset
        world = to_world(affine, ijk)
        centroid = world.mean(0)
        rim = to_world(affine, np.argwhere(_boundary(mask)) + offset)
        entry: dict[str, Any] = {
            "side": side_of(centroid[0], midline),
            "volume-ml": round(len(ijk) * voxel_ml, 3),
            "max-diameter-mm": round(max_diameter_mm(rim), 2),
            "polar-location": None,
            "exophytic-fraction": None,
            "distance-to-sinus-mm": None,
            "distance-to-kidney-mm": None,
            "centroid-ras-mm": [round(float(c), 1) for c in centroid],
        }
        if kidneys:
            owner = [k for k in kidneys if k.comp_id == comp[tuple(ijk[0])]]
            if owner:
                kidney, apart = owner[0], 0.0
            else:
                nearest, apart = _nearest_kidney(world, kidneys)
                kidney = kidneys[nearest]
            ctx = _context(kidney, labels, comp, spacing, sl)
            at = tuple((ijk - [b.start for b in ctx["box"]]).T)
            dist = None
            if ctx["dist"] is not None:
                d = float(ctx["dist"][at].min())
                dist = 0.0 if d <= touch else round(d, 2)
            entry |= {
                "side": kidney.side,
                "polar-location": _polar(float(centroid[2]), kidney.z_extent),
                "exophytic-fraction": round(1.0 - float(ctx["hull"][at].mean()), 3),
                "distance-to-sinus-mm": dist,
                "distance-to-kidney-mm": round(apart, 2),
            }
        out.append(entry)
    return sorted(out, key=lambda e: -e["volume-ml"])
