"""Surgical-planning measures on hand-built label maps with known answers.

Each map holds two ellipsoidal kidneys with a hilar notch (the renal sinus, a
medial concavity) and spherical tumours of known diameter, side and pole, drawn
in world (RAS+) millimetres and voxelised through several affines: the answers
must not depend on how the scan is stored.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from client.tasks.segmentation.measures import (
    kidney_measures,
    max_diameter_mm,
    tumour_measures,
)

# World box (mm) the grids cover, and the anatomy in it. RAS+: +x = patient's
# right, so the right kidney lies at x > 0.
EXTENT = np.array([130.0, 60.0, 80.0])
RIGHT, LEFT = np.array([75.0, 0.0, 0.0]), np.array([-75.0, 0.0, 0.0])
SEMI = np.array([30.0, 24.0, 55.0])  # lateral, AP, superior-inferior


def _affine(spacing, perm=(0, 1, 2), signs=(1, 1, 1)) -> np.ndarray:
    """Voxel-to-world affine: array axis ``a`` runs along world axis
    ``perm[a]`` in direction ``signs[a]``, centred on the world origin."""
    spacing = np.asarray(spacing, float)
    a = np.eye(4)
    a[:3, :3] = 0
    for ax, (w, s) in enumerate(zip(perm, signs, strict=True)):
        a[w, ax] = s * spacing[w]
    shape = tuple(int(2 * EXTENT[w] / spacing[w]) + 1 for w in perm)
    a[:3, 3] = -a[:3, :3] @ ((np.array(shape) - 1) / 2)
    return a, shape


AFFINES = {
    "ras-anisotropic": _affine((1.5, 1.5, 3.0)),
    "lps-flipped": _affine((1.5, 1.5, 3.0), signs=(-1, -1, 1)),
    "permuted-pli": _affine((2.0, 1.5, 2.5), perm=(1, 0, 2), signs=(-1, -1, -1)),
}


def _world(affine: np.ndarray, shape: tuple) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _kidneys(xyz: np.ndarray) -> np.ndarray:
    labels = np.zeros(xyz.shape[:3], np.uint8)
    for centre in (RIGHT, LEFT):
        medial = -np.sign(centre[0])
        inside = (((xyz - centre) / SEMI) ** 2).sum(-1) <= 1
        # the sinus opens medially through a hilum about 15 x 27 mm wide
        sinus_c = centre + [medial * 22.0, 0.0, 0.0]
        sinus = (((xyz - sinus_c) / [12.0, 10.0, 18.0]) ** 2).sum(-1) <= 1
        labels[inside & ~sinus] = 1
    return labels


def _ball(xyz, centre, radius) -> np.ndarray:
    return ((xyz - np.asarray(centre)) ** 2).sum(-1) <= radius**2


def _sphere_ml(radius: float) -> float:
    return 4 / 3 * math.pi * radius**3 / 1000


@pytest.fixture(params=list(AFFINES), scope="module")
def grid(request):
    affine, shape = AFFINES[request.param]
    return affine, _world(affine, shape)


def _max_spacing(affine) -> float:
    return float(np.sqrt((affine[:3, :3] ** 2).sum(0)).max())


def test_intraparenchymal_tumour_at_the_right_upper_pole(grid):
    affine, xyz = grid
    labels = _kidneys(xyz)
    labels[_ball(xyz, RIGHT + [0, 0, 28], 12.0)] = 2
    (t,) = tumour_measures(labels, affine)
    assert t["side"] == "right"
    assert t["polar-location"] == "upper pole"
    assert t["volume-ml"] == pytest.approx(_sphere_ml(12.0), rel=0.05)
    assert abs(t["max-diameter-mm"] - 24.0) <= _max_spacing(affine)
    assert t["exophytic-fraction"] < 0.02
    assert t["distance-to-kidney-mm"] == 0.0
    assert np.allclose(t["centroid-ras-mm"], RIGHT + [0, 0, 28], atol=0.5)
    kidneys = {k["side"]: k for k in kidney_measures(labels, affine)}
    assert set(kidneys) == {"left", "right"}
    assert kidneys["right"]["centroid-ras-mm"][0] > 0


def test_half_exophytic_tumour_on_the_left_kidney(grid):
    affine, xyz = grid
    labels = _kidneys(xyz)
    # centred on the lateral surface at mid-height: half in, half out
    labels[_ball(xyz, LEFT - [SEMI[0], 0, 0], 12.0)] = 2
    (t,) = tumour_measures(labels, affine)
    assert t["side"] == "left"
    assert t["polar-location"] == "interpolar"
    # The sphere's share outside the ellipsoid (Monte Carlo): a little over
    # half, the kidney's surface curving away from it.
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(100_000, 3))
    pts *= (
        12.0
        * rng.random((100_000, 1)) ** (1 / 3)
        / np.linalg.norm(pts, axis=1)[:, None]
    )
    truth = float(((((pts - [SEMI[0], 0, 0]) / SEMI) ** 2).sum(1) > 1).mean())
    assert 0.5 < truth < 0.65
    assert t["exophytic-fraction"] == pytest.approx(truth, abs=0.08)
    assert t["volume-ml"] == pytest.approx(_sphere_ml(12.0), rel=0.05)
    assert abs(t["max-diameter-mm"] - 24.0) <= _max_spacing(affine)


def test_lower_pole_and_sorting_by_volume(grid):
    affine, xyz = grid
    labels = _kidneys(xyz)
    labels[_ball(xyz, LEFT - [0, 0, 30], 9.0)] = 2
    labels[_ball(xyz, RIGHT + [0, 0, 30], 6.0)] = 2
    big, small = tumour_measures(labels, affine)
    assert (big["side"], big["polar-location"]) == ("left", "lower pole")
    assert (small["side"], small["polar-location"]) == ("right", "upper pole")
    assert big["volume-ml"] > small["volume-ml"]


def test_a_hilar_tumour_lies_nearer_the_sinus_than_a_lateral_one(grid):
    affine, xyz = grid
    hilar, lateral = _kidneys(xyz), _kidneys(xyz)
    hilar[_ball(xyz, RIGHT + [-20.0, 0, 26], 7.0)] = 2  # medial lip, above the hilum
    lateral[_ball(xyz, RIGHT + [SEMI[0], 0, 0], 12.0)] = 2
    (h,) = tumour_measures(hilar, affine)
    (x,) = tumour_measures(lateral, affine)
    assert h["distance-to-sinus-mm"] is not None
    assert x["distance-to-sinus-mm"] is not None
    assert h["distance-to-sinus-mm"] < 4.0 < x["distance-to-sinus-mm"]
    # from the tumour's inner edge (x + 18) to the sinus' lateral tip (x - 10)
    assert 20.0 < x["distance-to-sinus-mm"] < 36.0


def test_without_a_concavity_no_sinus_is_found():
    affine, shape = AFFINES["ras-anisotropic"]
    xyz = _world(affine, shape)
    labels = np.zeros(shape, np.uint8)
    for centre in (RIGHT, LEFT):
        labels[(((xyz - centre) / SEMI) ** 2).sum(-1) <= 1] = 1
    labels[_ball(xyz, RIGHT + [0, 0, 28], 10.0)] = 2
    (t,) = tumour_measures(labels, affine)
    assert t["distance-to-sinus-mm"] is None


def test_one_kidney_uses_the_image_midline_and_a_floating_tumour_its_nearest():
    affine, shape = AFFINES["lps-flipped"]
    xyz = _world(affine, shape)
    labels = _kidneys(xyz)
    labels[xyz[..., 0] > 0] = 0  # right nephrectomy
    labels[_ball(xyz, LEFT + [-45.0, 0, 0], 6.0)] = 2  # beside, not touching
    (k,) = kidney_measures(labels, affine)
    assert k["side"] == "left"
    (t,) = tumour_measures(labels, affine)
    assert t["side"] == "left" and t["polar-location"] == "interpolar"
    assert t["exophytic-fraction"] == 1.0
    # 45 - 30 (kidney's semi-axis) - 6 (radius) = 9 mm gap, voxel-coarse
    assert 7.0 < t["distance-to-kidney-mm"] < 12.0


def test_no_kidney_still_measures_the_tumour():
    affine, shape = AFFINES["ras-anisotropic"]
    xyz = _world(affine, shape)
    labels = np.zeros(shape, np.uint8)
    labels[_ball(xyz, [40.0, 0, 0], 9.0)] = 2
    (t,) = tumour_measures(labels, affine)
    assert t["side"] == "right"
    assert t["polar-location"] is None and t["exophytic-fraction"] is None
    assert kidney_measures(labels, affine) == []
    assert tumour_measures(np.zeros(shape, np.uint8), affine) == []


def test_max_diameter_of_few_points():
    assert max_diameter_mm(np.zeros((1, 3))) == 0.0
    square = np.array([[0, 0, 0], [3, 0, 0], [0, 4, 0], [3, 4, 0]], float)
    assert max_diameter_mm(square) == pytest.approx(5.0)  # coplanar: all pairs
