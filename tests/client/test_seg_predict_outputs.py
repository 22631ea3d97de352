"""What prediction writes and returns: uncertainty, lesions, measures, summary.

Two models: the registered unet-tiny, untrained, on a phantom CT stored in
another voxel order (the maps must land on the scan's grid whatever the
network says), and a stub whose logits follow the CT's intensity voxel by
voxel, on a hand-built scan whose answer is known: a right kidney with an
attached tumour, a left cyst, and a floating tumour speck that the
``tumour-touches-kidney`` rule removes.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch import nn

from client.tasks.segmentation.predict import (
    flip_dims,
    infer_probs,
    normalised_entropy,
    predict_scan,
)
from common.config import Plan
from common.task_models import build_plan_model
from sim.phantoms.ct import generate_case
from sim.phantoms.profiles import load_profile

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LESION_KEYS = {"region", "volume-ml", "confidence", "uncertainty", "centroid-ras-mm"}
TUMOUR_KEYS = {
    "side",
    "volume-ml",
    "max-diameter-mm",
    "polar-location",
    "exophytic-fraction",
    "distance-to-sinus-mm",
    "distance-to-kidney-mm",
    "centroid-ras-mm",
}


def _save_as(data: np.ndarray, affine: np.ndarray, axcodes, path: Path) -> Path:
    """Write ``data`` (RAS voxel order) stored in another voxel order."""
    img = nib.Nifti1Image(data, affine)
    start = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(axcodes)
    nib.save(img.as_reoriented(nib.orientations.ornt_transform(start, target)), path)
    return path


# -- the untrained unet-tiny on a phantom --------------------------------------
@pytest.fixture(scope="module")
def phantom_scan(tmp_path_factory) -> Path:
    case = generate_case(load_profile("standard-nephro"), seed=7, scale=5.0)
    tmp = tmp_path_factory.mktemp("phantom")
    return _save_as(case.image, case.affine, ("L", "P", "S"), tmp / "ct.nii.gz")


@pytest.mark.parametrize("tta", [0, 3])
def test_uncertainty_map_on_the_scan_grid(phantom_scan, tmp_path, tta):
    plan = Plan.model_validate({"spacing-mm": "8,8,10", "patch-size": "32,32,16"})
    model = build_plan_model(plan)
    out = tmp_path / "mask.nii.gz"
    res = predict_scan(model, phantom_scan, plan, torch.device("cpu"), out, tta=tta)
    scan = nib.load(str(phantom_scan))
    unc_path = Path(res["uncertainty-output"])
    assert unc_path == tmp_path / "mask_uncertainty.nii.gz"
    unc = nib.load(str(unc_path))
    assert unc.shape == scan.shape and np.allclose(unc.affine, scan.affine)
    values = np.asanyarray(unc.dataobj)
    assert values.dtype == np.float32
    assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0
    assert res["tta"] == tta and res["postprocess"] == "none"
    for row in res["lesions"]:
        assert set(row) == LESION_KEYS and row["region"] in ("tumour", "cyst")
        assert 0 <= row["confidence"] <= 1 and 0 <= row["uncertainty"] <= 1
    for t in res["tumours"]:
        assert set(t) == TUMOUR_KEYS
    assert Path(res["summary-image"]).read_bytes()[:8] == PNG_MAGIC


def test_flips_average_to_the_unflipped_map_for_a_flip_equivariant_net():
    # A voxel-wise network commutes with flips: TTA must return its own output.
    plan = Plan.model_validate({"patch-size": "16,16,16"})
    x = torch.rand(1, 1, 20, 18, 17)
    probs = infer_probs(_IntensityNet(), x, plan, torch.device("cpu"), tta=3)
    plain = infer_probs(_IntensityNet(), x, plan, torch.device("cpu"), tta=0)
    assert probs.shape == (4, 20, 18, 17)
    assert torch.allclose(probs, plain, atol=1e-6)
    assert torch.allclose(probs.sum(0), torch.ones(20, 18, 17), atol=1e-5)
    assert flip_dims(3) == [(), (2,), (3,), (4,)]
    with pytest.raises(ValueError, match="tta must be 0"):
        flip_dims(4)


def test_normalised_entropy_bounds():
    certain = torch.tensor([1.0, 0.0, 0.0, 0.0])[:, None]
    even = torch.full((4, 1), 0.25)
    assert float(normalised_entropy(certain)) == 0.0
    assert float(normalised_entropy(even)) == pytest.approx(1.0)


# -- a stub whose answer is known ----------------------------------------------
# Intensity after the plan's default window (-150..350 HU -> 0..1) at which
# each class is most likely: background (fat, -50 HU), kidney (150), tumour
# (300), cyst (50). Air (0) is nearest background too.
CLASS_CENTRES = torch.tensor([0.2, 0.6, 0.9, 0.4])


class _IntensityNet(nn.Module):
    """Logits from each voxel's intensity alone: the nearest class centre."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centres = CLASS_CENTRES.to(x).view(1, 4, 1, 1, 1)
        return -(((x - centres) / 0.08) ** 2)


SPACING = (4.0, 4.0, 5.0)


def _stub_scan(path: Path) -> Path:
    """Body of fat in air; right kidney (RAS+ x > 0) with a tumour on its
    lateral side; a left cyst; a tumour speck floating in the body's fat."""
    shape = (72, 52, 40)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * SPACING
    ijk = np.stack(np.meshgrid(*map(np.arange, shape), indexing="ij"), -1)
    x, y, z = np.moveaxis(ijk @ affine[:3, :3].T + affine[:3, 3], -1, 0)
    hu = np.full(shape, -1000.0, np.float32)
    hu[(x / 135) ** 2 + (y / 95) ** 2 <= 1] = -50.0
    hu[(np.abs(x - 70) <= 14) & (np.abs(y) <= 12) & (np.abs(z) <= 30)] = 150.0
    hu[((x - 88) ** 2 + y**2 + (z - 10) ** 2) <= 10**2] = 300.0
    hu[((x + 70) ** 2 + y**2 + z**2) <= 9**2] = 50.0
    hu[(np.abs(x + 20) <= 4) & (np.abs(y - 50) <= 4) & (np.abs(z + 40) <= 5)] = 300.0
    return _save_as(hu, affine, ("L", "P", "S"), path)


@pytest.fixture(scope="module")
def stub_scan(tmp_path_factory) -> Path:
    return _stub_scan(tmp_path_factory.mktemp("stub") / "stub.nii.gz")


def _stub_predict(scan: Path, out: Path | None, rule: str, tta: int = 3) -> dict:
    plan = Plan.model_validate({"spacing-mm": "4,4,5", "patch-size": "32,32,16"})
    return predict_scan(
        _IntensityNet(), scan, plan, torch.device("cpu"), out, postprocess=rule, tta=tta
    )


def test_known_lesions_and_measures(stub_scan, tmp_path):
    res = _stub_predict(stub_scan, tmp_path / "out" / "case.nii.gz", "none")
    regions = [row["region"] for row in res["lesions"]]
    assert sorted(regions) == ["cyst", "tumour", "tumour"]
    vols = [row["volume-ml"] for row in res["lesions"]]
    assert vols == sorted(vols, reverse=True)
    tumour = next(r for r in res["lesions"] if r["region"] == "tumour")
    assert tumour["confidence"] > 0.9 and tumour["uncertainty"] < 0.2
    assert tumour["centroid-ras-mm"][0] > 80  # the attached one: right, lateral
    assert res["tumours"][0]["side"] == "right"
    assert res["tumours"][0]["exophytic-fraction"] > 0.3
    assert 0 < res["uncertainty-mean-kidney"] < 1
    json.dumps(res)  # the driver writes it as JSON
    png = Path(res["summary-image"])
    assert png == tmp_path / "out" / "case_summary.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert imread(str(png)).ndim == 3
    mask = nib.load(str(tmp_path / "out" / "case.nii.gz"))
    scan = nib.load(str(stub_scan))
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)


def test_tumour_touches_kidney_removes_the_floating_speck(stub_scan, tmp_path):
    before = _stub_predict(stub_scan, tmp_path / "a.nii.gz", "none", tta=0)
    after = _stub_predict(
        stub_scan, tmp_path / "b.nii.gz", "tumour-touches-kidney", tta=0
    )
    assert after["postprocess"] == "tumour-touches-kidney"
    assert len(before["tumours"]) == 2 and len(after["tumours"]) == 1
    assert after["tumours"][0] == before["tumours"][0]  # the attached one stays
    speck_ml = before["tumours"][1]["volume-ml"]
    vb, va = before["volumes-ml"], after["volumes-ml"]
    assert va["tumour"] == pytest.approx(vb["tumour"] - speck_ml, abs=1e-6)
    assert va["kidney"] == vb["kidney"] and va["cyst"] == vb["cyst"]
    # the speck's voxels are background in the written mask
    scan = nib.load(str(stub_scan))
    centre = np.linalg.solve(scan.affine, [-20.0, 50.0, -40.0, 1.0])[:3]
    i, j, k = np.rint(centre).astype(int)
    assert np.asanyarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj)[i, j, k] == 2
    assert np.asanyarray(nib.load(str(tmp_path / "b.nii.gz")).dataobj)[i, j, k] == 0


def test_no_output_writes_nothing(stub_scan, tmp_path):
    res = _stub_predict(stub_scan, None, "none", tta=0)
    assert res["output"] is None and res["uncertainty-output"] is None
    assert res["summary-image"] is None and len(res["lesions"]) == 3
