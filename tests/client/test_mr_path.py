"""MR sites (issue 29): the site YAML's modality, the site check, MR
preprocessing (and CT's left as it was), a round on MR phantoms, and the real MR
scan through ``predict``: accepted by an MR model, refused by a CT one."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord
from monai import transforms as mt

from client import app as site_app
from client.predict import predict
from client.readiness import check_site
from client.request_refused import RequestRefused
from client.scan_check import ScanMismatch, header_modality
from client.tasks.segmentation.cases import load_site_cases
from client.tasks.segmentation.pipeline import (
    IMAGE,
    LABEL,
    _cache_dir,
    preprocessing,
    require_modality,
)
from common import packing, wire
from common.config import ConfigError, Plan, load_site_config
from common.models import build_model
from common.task_models import build_plan_model
from common.weights import export_state
from server.checkpoint import save_checkpoint
from sim.phantoms.ct import anatomy, generate_case
from sim.phantoms.kits_writer import write_site
from sim.phantoms.mr import t2
from sim.phantoms.profiles import PROFILES, SIDECAR_NAME, load_profile
from sim.phantoms.sites import write_site_phantom
from tests.fakes import (
    TINY_PLAN,
    TINY_SCALE,
    site_context,
    site_message,
    write_site_yaml,
)

pytestmark = pytest.mark.usefixtures("task_identity")

REAL = Path(__file__).parents[2] / ".." / "shared" / "data" / "real"
REAL_MR = REAL / "kidney-mr-1.nii.gz"
MR_PLAN = {
    **TINY_PLAN,
    "model": "unet-tiny",
    "modality": "MR",
    "num-server-rounds": 1,
    "local-epochs": 1,
    "learning-rate": 0.003,
    "dp-target-epsilon": 20.0,
}


def _site(tmp: Path, name: str, profile: str, modality: str, cases: int = 5) -> Path:
    """A phantom site YAML of ``profile`` whose data.modality is ``modality``."""
    path = write_site_yaml(tmp, name, cases=cases, profile=profile)
    doc = yaml.safe_load(path.read_text())
    doc["data"]["modality"] = modality
    path.write_text(yaml.safe_dump(doc))
    return path


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# -- the site YAML and the plan ------------------------------------------------------


def test_modality_is_a_validated_site_key(tmp_path):
    path = write_site_yaml(tmp_path, "h", cases=2)
    assert load_site_config(path).data.modality == "CT"  # the default
    doc = yaml.safe_load(path.read_text())
    for good in ("CT", "MR"):
        doc["data"]["modality"] = good
        path.write_text(yaml.safe_dump(doc))
        assert load_site_config(path).data.modality == good
    for bad in ("PET", "mr", 3):
        doc["data"]["modality"] = bad
        path.write_text(yaml.safe_dump(doc))
        with pytest.raises(ConfigError) as err:
            load_site_config(path)
        msg = str(err.value)
        assert "h.yaml" in msg and "data.modality" in msg and "CT or MR" in msg


def test_the_plan_names_a_modality_and_a_mismatch_refuses():
    assert Plan().modality == "CT"
    assert Plan.model_validate({"modality": "mixed"}).modality == "mixed"
    with pytest.raises(ValueError, match="modality"):
        Plan.model_validate({"modality": "PET"})
    # a CT checkpoint does not resume as an MR one
    assert Plan().fingerprint() != Plan.model_validate({"modality": "MR"}).fingerprint()


def test_a_site_of_the_other_modality_refuses_to_train(tmp_path):
    ct_yaml = write_site_yaml(tmp_path, "ct", cases=3)
    ct = load_site_config(ct_yaml)
    mr = ct.model_copy(update={"data": ct.data.model_copy(update={"modality": "MR"})})
    with pytest.raises(RequestRefused) as err:
        require_modality(mr, Plan())
    assert err.value.code == "request-invalid"
    assert "plan is for CT" in str(err.value) and "data.modality is MR" in str(
        err.value
    )
    assert require_modality(mr, Plan.model_validate({"modality": "mixed"})) == "MR"
    assert require_modality(ct, Plan()) == "CT"
    # over the wire: a refusal with its code, nothing trained
    ctx = site_context(ct_yaml, MR_PLAN)
    model = build_model("unet-tiny")
    reply = site_app.train(
        site_message("train", ArrayRecord(model.state_dict()), 1), ctx
    )
    assert reply.content[wire.SITE][wire.REFUSAL_CODE] == "request-invalid"
    assert wire.ARRAYS not in reply.content.array_records
    assert not (ct.state_dir / "cache").exists()  # refused before preprocessing


# -- the site check ------------------------------------------------------------------


def test_site_check_names_scans_of_the_other_modality(tmp_path):
    mr_as_ct = check_site(_site(tmp_path, "mr-as-ct", "mr-t2", "CT", cases=3))
    ct_as_mr = check_site(_site(tmp_path, "ct-as-mr", "standard-nephro", "MR", cases=3))
    mr_as_mr = check_site(_site(tmp_path, "mr-as-mr", "mr-t2", "MR", cases=3))
    for report, says, looks in ((mr_as_ct, "CT", "MR"), (ct_as_mr, "MR", "CT")):
        found = [f for f in report.findings if f.kind == "modality"]
        assert len(found) == 3 and all(f.severity == "error" for f in found)
        assert f"data.modality says {says} but case_00000/imaging.nii.gz looks " in (
            found[0].message
        )
        assert f"looks like {looks}" in found[0].message
        assert f"data.modality: {looks}" in found[0].fix
        assert report.cases_usable == 0 and not report.ok
    assert (
        "CT in HU" in [f for f in ct_as_mr.findings if f.kind == "modality"][0].message
    )
    assert not [f for f in mr_as_mr.findings if f.kind.startswith("modality")]
    assert mr_as_mr.cases_usable == 3


# -- preprocessing -------------------------------------------------------------------


def _plain_ct(plan: Plan) -> mt.Compose:
    """The CT transforms as they were before MR existed, written out."""
    lo, hi = plan.hu_window
    keys = [IMAGE, LABEL]
    if plan.intensity_mean is None:
        steps = [
            mt.ScaleIntensityRanged(
                keys=[IMAGE], a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True
            ),
            mt.CropForegroundd(
                keys=keys, source_key=IMAGE, margin=2, select_fn=lambda x: x > 0
            ),
        ]
    else:
        steps = [
            mt.ScaleIntensityRanged(
                keys=[IMAGE], a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True
            ),
            mt.CropForegroundd(
                keys=keys, source_key=IMAGE, margin=2, select_fn=lambda x: x > lo
            ),
            mt.NormalizeIntensityd(
                keys=[IMAGE],
                subtrahend=plan.intensity_mean,
                divisor=plan.intensity_std,
            ),
        ]
    return mt.Compose(
        [
            mt.LoadImaged(keys=keys, image_only=True, reader="NibabelReader"),
            mt.EnsureChannelFirstd(keys=keys),
            mt.Orientationd(keys=keys, axcodes="RAS"),
            mt.Spacingd(
                keys=keys, pixdim=plan.spacing_mm, mode=("bilinear", "nearest")
            ),
            *steps,
            mt.EnsureTyped(keys=[IMAGE], dtype=torch.float32, track_meta=False),
            mt.EnsureTyped(keys=[LABEL], dtype=torch.uint8, track_meta=False),
        ]
    )


def _case_files(tmp: Path, profile: str, seed: int) -> dict[str, str]:
    case = generate_case(load_profile(profile), seed, scale=TINY_SCALE)
    return {
        IMAGE: str(_save_nifti(tmp / f"{profile}-i.nii.gz", case.image, case.affine)),
        LABEL: str(_save_nifti(tmp / f"{profile}-l.nii.gz", case.label, case.affine)),
    }


def test_ct_preprocessing_and_cache_are_as_before(tmp_path):
    files = _case_files(tmp_path, "standard-nephro", 3)
    site = load_site_config(write_site_yaml(tmp_path, "h", cases=2, generate=False))
    for extra in ({}, {"intensity-mean": 80.0, "intensity-std": 60.0}):
        plan = Plan.model_validate({**TINY_PLAN, **extra})
        got, want = preprocessing(plan)(dict(files)), _plain_ct(plan)(dict(files))
        for key in (IMAGE, LABEL):
            assert torch.equal(got[key], want[key])
        # the cache key CT always had: existing caches stay valid
        norm = [plan.intensity_mean, plan.intensity_std]
        key = json.dumps([plan.spacing_mm, plan.hu_window, norm, [], "v1"]).encode()
        assert _cache_dir(site, plan).name == hashlib.sha256(key).hexdigest()[:12]
        assert _cache_dir(site, plan, None, "MR") != _cache_dir(site, plan)


def test_mr_preprocessing_normalises_each_scan_within_its_body(tmp_path):
    plan = Plan.model_validate({**TINY_PLAN, "modality": "MR"})
    for seed in (1, 2):
        files = _case_files(tmp_path, "mr-t2", seed)
        out = preprocessing(plan)(files)
        x, y = out[IMAGE].numpy()[0], out[LABEL].numpy()[0]
        assert np.isfinite(x).all()
        body = x > x.min() + 1e-3  # outside the body: the clip floor
        assert 0.3 < body.mean() < 0.95
        assert abs(float(x[body].mean())) < 0.3
        assert abs(float(x[body].std()) - 1.0) < 0.2
        assert float(x[y == 1].mean()) > 1.0  # T2: the kidney is bright
        assert (y > 0).sum() > 0  # the crop kept the kidneys


def test_the_mr_phantom_is_the_anatomy_in_t2_with_a_sidecar(tmp_path):
    ct = PROFILES["standard-nephro"]
    assert np.array_equal(
        anatomy(ct, 5, 6.0, tone=t2).label, generate_case(ct, 5, 6.0).label
    )
    mr = load_profile("mr-t2")
    case = generate_case(mr, 5, TINY_SCALE)
    assert case.image.min() >= 0 and np.isfinite(case.image).all()
    assert float(np.percentile(case.image[case.label == 0], 1)) > 0  # Rician floor
    with pytest.raises(ValueError, match="mr-t2"):
        load_profile("no-such-profile")
    (folder,) = write_site(tmp_path / "mr", mr, 1, scale=TINY_SCALE)
    assert json.loads((folder / SIDECAR_NAME).read_text())["Modality"] == "MR"
    img = folder / "imaging.nii.gz"
    assert header_modality(img, nib.load(str(img))) == "MR"
    meta = json.loads((tmp_path / "mr" / "phantom.json").read_text())
    assert meta["profile"]["modality"] == "MR"
    # a demo site whose phantom profile is MR must say data.modality: MR
    site = load_site_config(_site(tmp_path, "x", "mr-t2", "CT", cases=2))
    with pytest.raises(ValueError, match="data.modality is CT"):
        write_site_phantom(site)


# -- a round on MR phantoms ----------------------------------------------------------


def test_an_mr_phantom_site_trains_a_round_and_evaluates(tmp_path):
    yaml_path = _site(tmp_path, "mr", "mr-t2", "MR", cases=5)
    ctx = site_context(yaml_path, MR_PLAN)
    model = build_model("unet-tiny")
    reply = site_app.train(
        site_message("train", ArrayRecord(model.state_dict()), 1), ctx
    )
    metrics = reply.content[wire.METRICS]
    assert metrics[wire.REFUSED] == 0 and metrics[wire.NUM_EXAMPLES] > 0
    sent = packing.unpack_arrays(reply.content[wire.ARRAYS]).to_torch_state_dict()
    assert all(torch.isfinite(v).all() for v in sent.values())
    ev = site_app.evaluate(site_message("evaluate", ArrayRecord(sent), 1), ctx)
    assert 0.0 <= ev.content[wire.METRICS][wire.dice_key("kidney")] <= 1.0
    site, plan = load_site_config(yaml_path), Plan.model_validate(MR_PLAN)
    label_map = load_site_cases(site).label_map
    cached = [p.name for p in (site.state_dir / "cache").iterdir()]
    assert cached == [_cache_dir(site, plan, label_map, "MR").name]


# -- the real MR scan through predict ------------------------------------------------


def _model_dir(tmp: Path, modality: str) -> Path:
    """A checkpoint folder of an untrained unet-tiny under a ``modality`` plan."""
    plan = Plan.model_validate({**MR_PLAN, "modality": modality})
    torch.manual_seed(0)
    model = build_plan_model(plan)
    sidecar = {"plan": plan.model_dump(by_alias=True, mode="json"), "model": plan.model}
    save_checkpoint(tmp / modality / "final", 1, export_state(model), sidecar)
    return tmp / modality / "final"


@pytest.fixture(scope="module")
def real_mr() -> Path:
    if not REAL.is_dir():
        pytest.skip(f"{REAL.resolve()} is absent: the real MR scan is not here")
    return REAL_MR


def test_the_real_mr_scan_is_predicted_by_an_mr_model_only(real_mr, tmp_path):
    src = nib.load(str(real_mr))
    assert nib.aff2axcodes(src.affine) == ("L", "P", "S")
    out, js = tmp_path / "mask.nii.gz", tmp_path / "mr.json"
    summary = predict(_model_dir(tmp_path, "MR"), real_mr, out, js, device="cpu")
    mask = nib.load(str(out))
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    case = summary["cases"]["kidney-mr-1"]
    kidney = case["volumes-ml"]["kidney"]
    assert np.isfinite(kidney) and kidney >= 0
    assert "forced" not in case
    with pytest.raises(ScanMismatch) as err:
        predict(_model_dir(tmp_path, "CT"), real_mr, tmp_path / "ct.nii.gz")
    assert "not CT in Hounsfield units" in str(err.value)
    assert not (tmp_path / "ct.nii.gz").exists()


def test_an_mr_model_refuses_a_ct_scan(tmp_path):
    case = generate_case(PROFILES["standard-nephro"], 7, scale=4.0)
    scan = _save_nifti(tmp_path / "ct.nii.gz", case.image, case.affine)
    with pytest.raises(ScanMismatch) as err:
        predict(_model_dir(tmp_path, "MR"), scan, tmp_path / "out.nii.gz")
    assert "the model was trained on MR; this scan looks like CT in HU" in str(
        err.value
    )
