"""The prognosis task end to end at one site, without Flower: crops, the
networks under Opacus, evaluation on the contract and under the floor,
prediction, and the errors a hospital sees."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.grad_sample.utils import prepare_module
from torch.utils.data import TensorDataset

from client.data.errors import SiteDataError
from client.disclosure import denominator_counts, release
from client.privacy.dpsgd import DPSpec
from client.tasks.prognosis.data import N_COVARIATES, crop_scan
from client.tasks.registry import get_task, site_task
from client.train import local_train
from common import wire
from common.config import MAX_SURVIVAL_INTERVALS, Plan, load_site_config
from common.contract import allowed_metric, max_metric_keys, value_problems
from common.models import MODELS, build_model
from common.survival import LogisticHazardLoss, km_counts
from common.survival_metrics import survival_metrics
from common.task_models import build_plan_model
from server.reporting.round_record import weighted_eval_means
from sim.phantoms.kits_writer import write_site
from sim.phantoms.profiles import load_profile
from sim.phantoms.survival import write_outcomes
from sim.subgroups import plant_subgroups
from tests.fakes import assert_each_case_own_gradient

PROGNOSIS = sorted(n for n, s in MODELS.items() if s.task == "prognosis")
PLAN = {"task": "prognosis", "model": "prognosis-cnn", "prognosis-crop-voxels": 16}
CPU = torch.device("cpu")


def _site(tmp: Path, name: str, cases: int, outcomes: bool = True) -> Path:
    root = tmp / "data" / name
    write_site(root, load_profile("thin-slice-cm"), cases, seed=5, scale=5.0)
    if outcomes:
        plant_subgroups(root, "thin-slice-cm", 5)
        write_outcomes(root, 5)
    doc = {
        "name": name,
        "data": {"root": str(root), "validation_fraction": 0.4},
        "device": "cpu",
        "state_dir": str(tmp / "state" / name),
        "privacy": {"enabled": False, "min_cases_for_aggregates": 3},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def site_yaml(tmp_path_factory) -> Path:
    return _site(tmp_path_factory.mktemp("prognosis"), "hospital-p", 30)


def _batch(n: int = 4, side: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_COVARIATES + 2 * side**3, generator=g)
    time = torch.tensor([100.0, 400.0, 900.0, 2000.0][:n])
    event = torch.tensor([1.0, 0.0, 1.0, 0.0][:n])
    return x, torch.stack([time, event], 1)


@pytest.mark.parametrize("name", PROGNOSIS)
def test_per_sample_gradients_are_each_patients_own(name):
    """Opacus' per-sample gradients of the logistic-hazard loss, in the
    registry's mode, equal each patient's gradient computed alone: the loss
    and the network mix no patients, so clipping bounds each one."""
    edges = Plan().survival_edges_days
    model = build_model(name, 1, len(edges), seed=1)
    alone = copy.deepcopy(model)
    net = prepare_module(model, MODELS[name].grad_sample_mode, loss_reduction="sum")
    x, y = _batch()
    loss = LogisticHazardLoss(edges)
    # the batch loss is a mean of per-patient terms; times B is their sum
    (loss(net(x), y) * len(x)).backward()
    assert_each_case_own_gradient(model, alone, x, y, loss, atol=1e-6)
    net.remove_hooks()


@pytest.mark.parametrize("name", PROGNOSIS)
def test_dp_step_at_zero_noise_is_the_plain_step(name):
    x, y = _batch()
    edges = Plan().survival_edges_days
    train = dict(
        epochs=1,
        batch_size=len(x),
        learning_rate=0.1,
        optimizer="sgd",
        device=CPU,
        seed=0,
    )
    plain = build_model(name, 1, len(edges), seed=2)
    private = build_model(name, 1, len(edges), seed=2)
    loss = LogisticHazardLoss(edges)
    local_train(plain, TensorDataset(x, y), loss, **train)
    dp = DPSpec(0.0, 1e6, MODELS[name].grad_sample_mode)
    local_train(private, TensorDataset(x, y), loss, dp=dp, **train)
    for (k, v), w in zip(
        plain.state_dict().items(), private.state_dict().values(), strict=True
    ):
        assert torch.allclose(v, w, rtol=1e-4, atol=1e-6), k


def test_crop_is_taken_in_world_coordinates():
    """The same anatomy stored in another voxel order (axis flipped, affine
    flipped to match) gives the same crop: a site's scanner orientation does
    not change what the model sees."""
    rng = np.random.default_rng(0)
    image = rng.normal(40, 30, (40, 36, 20)).astype(np.float32)
    labels = np.zeros(image.shape, np.uint8)
    labels[10:22, 8:20, 5:12] = 1
    labels[14:18, 12:16, 7:10] = 2
    affine = np.diag([3.0, 3.0, 5.0, 1.0])
    plan = Plan.model_validate(PLAN)
    a = crop_scan(image, affine, labels, plan, mr=False)
    flipped = affine.copy()
    flipped[0, 0], flipped[0, 3] = -3.0, 3.0 * (image.shape[0] - 1)
    b = crop_scan(image[::-1].copy(), flipped, labels[::-1].copy(), plan, mr=False)
    assert a.centre == b.centre == "tumour"
    assert np.allclose(a.image, b.image, atol=1e-4)
    assert a.size_cm == pytest.approx(b.size_cm) == pytest.approx(1.5)
    side = plan.prognosis_crop_voxels
    assert a.image[1, side // 2, side // 2, side // 2] == 1.0  # centred on it
    with pytest.raises(ValueError, match="no kidney and no tumour"):
        crop_scan(image, affine, np.zeros_like(labels), plan, mr=False)


def test_site_evaluates_on_the_contract_and_under_its_floor(site_yaml):
    site = load_site_config(site_yaml)
    assert site_task(site).name == "prognosis"  # outcomes beside the scans
    plan = Plan.model_validate(PLAN)
    task = get_task("prognosis")
    data = task.load_data(site, plan)
    assert data.n_train >= 10 and data.n_val >= 8
    metrics = task.evaluate(build_plan_model(plan), data, plan, CPU)
    assert all(allowed_metric(k, wire.MSG_EVALUATE, "prognosis") for k in metrics)
    assert value_problems(metrics, 100_000) == []
    assert {wire.C_HARRELL, wire.C_UNO, wire.CASES_EVENT} <= set(metrics)
    events = int(metrics[wire.CASES_EVENT])
    counts = denominator_counts(metrics, data.n_val, task.denominators(data, plan))
    # a floor above the events: no score leaves, whatever the patients
    above = release(metrics, counts, events + 1)
    assert not any(wire.SURVIVAL_SCORE.fullmatch(k) for k in above)
    # a floor the events reach: the scores leave; a life-table event count
    # leaves only with at least the floor at risk in its interval
    floor = max(1, min(events, 3))
    released = release(metrics, counts, floor)
    assert wire.C_HARRELL in released
    for key in released:
        if (km := wire.KM_EVENTS_KEY.fullmatch(key)) is not None:
            assert metrics[wire.atrisk_key(km[1], int(km[2]))] >= floor


def test_a_site_without_outcomes_is_told_what_to_add(tmp_path):
    site = load_site_config(_site(tmp_path, "no-outcomes", 6, outcomes=False))
    with pytest.raises(SiteDataError, match="outcomes.csv"):
        get_task("prognosis").load_data(site, Plan.model_validate(PLAN))


def test_predict_gives_a_risk_score_and_a_curve(site_yaml, tmp_path):
    site = load_site_config(site_yaml)
    case = sorted(Path(site.data.root).glob("case_*"))[0]
    plan = Plan.model_validate(PLAN)
    task = get_task("prognosis")
    out = task.predict(
        build_plan_model(plan), case / "imaging.nii.gz", plan, CPU, tmp_path, age=67
    )
    assert out["crop-labels"].startswith("reference labels")
    curve = list(out["survival"].values())
    assert len(curve) == len(plan.survival_edges_days)
    assert all(b <= a + 1e-9 for a, b in zip(curve, curve[1:], strict=False))
    assert out["covariates-unknown"] == ["sex"]
    saved = json.loads(Path(out["output"]).read_text())
    assert saved["risk-score"] == pytest.approx(out["risk-score"])
    assert Path(out["plot"]).stat().st_size > 1000
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes((case / "imaging.nii.gz").read_bytes())
    with pytest.raises(ValueError, match="--labels"):
        task.predict(build_plan_model(plan), scan, plan, CPU, None)


def test_the_largest_plan_fits_the_reply_contract():
    """With the most intervals and horizons a plan may ask for, an evaluate
    reply's keys stay within the contract's count."""
    edges = tuple(float(90 * (i + 1)) for i in range(MAX_SURVIVAL_INTERVALS))
    horizons = (180.0, 365.0, 730.0, 1095.0)
    rng = np.random.default_rng(1)
    n = 60
    time, event = rng.uniform(10, edges[-1], n), rng.integers(0, 2, n)
    curve = np.sort(rng.uniform(0, 1, (n, len(edges))), 1)[:, ::-1]
    risk = rng.normal(size=n)
    keys = survival_metrics(time, event, time, event, curve, risk, edges, horizons)
    keys |= km_counts(time, event, risk, edges)
    fixed = len(wire.REPLY_METRICS[wire.MSG_EVALUATE])
    fixed += len(wire.REPLY_LIST_METRICS[wire.MSG_EVALUATE])
    assert len(keys) <= max_metric_keys(wire.MSG_EVALUATE, "prognosis", 4) - fixed
    assert len(keys) > 4 * MAX_SURVIVAL_INTERVALS  # every interval, both groups
    with pytest.raises(ValueError, match="survival-edges-days"):
        Plan.model_validate({"survival-edges-days": ",".join(["30"] * 3)})


def test_the_coordinator_sums_life_tables_and_weights_scores_by_patients():
    a = {
        wire.C_HARRELL: 0.8, wire.CASES_OUTCOME: 30.0,
        "cases-atrisk-low-0": 15.0, "km-events-low-0": 2.0,
    }  # fmt: skip
    b = {
        wire.C_HARRELL: 0.6, wire.CASES_OUTCOME: 10.0,
        "cases-atrisk-low-0": 5.0, "km-events-low-0": 1.0,
    }  # fmt: skip
    pooled = weighted_eval_means({"a": a, "b": b})
    assert pooled["km-events-low-0"] == 3.0
    assert pooled["cases-atrisk-low-0"] == 20.0
    assert pooled[wire.C_HARRELL] == pytest.approx((0.8 * 30 + 0.6 * 10) / 40)


def test_radiomics_read_the_tumours_attenuation_against_the_kidney():
    """A hypo-enhancing tumour with a necrotic core reads lower enhancement
    and a lower tail than an enhancing one; without a tumour all are 0; MR is
    relative to the kidney, so a scanner's scale factor does not change it."""
    from client.tasks.prognosis.data import first_order

    labels = np.zeros((20, 20, 10), np.uint8)
    labels[2:12, 2:12, 2:8] = 1
    labels[4:8, 4:8, 3:6] = 2
    image = np.full(labels.shape, 180.0, np.float32)
    bright = np.where(labels == 2, 170.0, image)
    dark = np.where(labels == 2, 120.0, image)
    dark[5, 5, 4] = 20.0  # a necrotic voxel
    b, d = first_order(bright, labels, mr=False), first_order(dark, labels, mr=False)
    assert d[0] < b[0] < 0 and d[2] < b[2] and d[1] > b[1]
    assert not first_order(image, np.minimum(labels, 1), mr=False).any()
    assert np.allclose(
        first_order(dark, labels, True), first_order(dark * 7, labels, True)
    )


@settings(max_examples=60, deadline=None)
@given(
    edges=st.one_of(
        st.text(max_size=30),
        st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=25).map(
            lambda v: ",".join(repr(x) for x in v)
        ),
    ),
    horizons=st.lists(st.floats(-10, 1e6), max_size=6).map(
        lambda v: ",".join(f"{x:g}" for x in v)
    ),
    voxels=st.integers(-5, 10_000),
    crop_mm=st.floats(allow_nan=True, allow_infinity=True),
)
def test_a_coordinators_prognosis_keys_are_bounded_or_refused(
    edges, horizons, voxels, crop_mm
):
    """Whatever a coordinator's plan says of the intervals, horizons and crop,
    the site builds a plan within the bounds it sized its replies and memory
    for, or refuses it: never a plan past them."""
    raw = {
        "task": "prognosis",
        "survival-edges-days": edges,
        "survival-horizons-days": horizons or "365",
        "prognosis-crop-voxels": voxels,
        "prognosis-crop-mm": crop_mm,
    }
    try:
        plan = Plan.model_validate(raw)
    except ValueError:
        return
    e, h = plan.survival_edges_days, plan.survival_horizons_days
    assert 1 <= len(e) <= MAX_SURVIVAL_INTERVALS and 1 <= len(h) <= 4
    assert all(0 < a < b <= 36_500 for a, b in zip((0.0, *e), e, strict=False))
    assert h[-1] <= e[-1] and 8 <= plan.prognosis_crop_voxels <= 64
    assert 32 <= plan.prognosis_crop_mm <= 512


def test_an_mr_model_predicts_on_the_scans_own_scale(site_yaml, tmp_path):
    """An MR plan z-scores the crop (MR has no fixed units): the same scan
    stored at another intensity scale gets the same risk and curve."""
    import nibabel as nib

    site = load_site_config(site_yaml)
    case = sorted(Path(site.data.root).glob("case_*"))[1]
    plan = Plan.model_validate({**PLAN, "modality": "MR"})
    task = get_task("prognosis")
    model = build_plan_model(plan)
    img = nib.load(str(case / "imaging.nii.gz"))
    scaled = tmp_path / "scaled.nii.gz"
    data = np.asarray(img.dataobj, dtype=np.float32) * 7.0
    nib.save(nib.Nifti1Image(data, img.affine), str(scaled))
    labels = case / "segmentation.nii.gz"
    a = task.predict(model, case / "imaging.nii.gz", plan, CPU, None, labels=labels)
    b = task.predict(model, scaled, plan, CPU, None, labels=labels)
    assert a["risk-score"] == pytest.approx(b["risk-score"], rel=1e-3)
    assert a["survival"] == pytest.approx(b["survival"], rel=1e-3)


def test_a_prognosis_model_refuses_a_scan_unlike_its_training_data(site_yaml, tmp_path):
    """``kidneyfl predict`` checks a prognosis model's scans as it checks a
    segmentation model's: an MR-like volume (no air, values from 0) is refused
    by a CT model, naming why; a phantom CT passes."""
    import nibabel as nib

    from client.predict import check_scans
    from client.scan_check import ScanMismatch

    site = load_site_config(site_yaml)
    ct = sorted(Path(site.data.root).glob("case_*"))[0] / "imaging.nii.gz"
    img = nib.load(str(ct))
    mr_like = tmp_path / "mr.nii.gz"
    data = np.asarray(img.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image(data - data.min(), img.affine), str(mr_like))
    plan = Plan.model_validate(PLAN)
    assert check_scans({"ct": ct}, plan, {}, force=False)["ct"].problems == []
    with pytest.raises(ScanMismatch, match="not CT in Hounsfield units"):
        check_scans({"mr": mr_like}, plan, {}, force=False)
    forced = check_scans({"mr": mr_like}, plan, {}, force=True)
    assert forced["mr"].problems
