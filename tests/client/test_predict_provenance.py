"""What a prediction says about its model and its scan: a synthetic-only
model, and a scan unlike the training data (``client/predict.py``,
``common/ood.py``), in the terminal, the JSON and each NIfTI's description;
and the same warning on an exported model (``server/export.py``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from cli.main import main as kidneyfl
from client import predict as predict_mod
from client.predict import predict, summary_lines
from client.scan_check import check_scan
from common.config import Plan
from common.ood import (
    STD_FLOOR,
    SYNTHETIC_ONLY_WARNING,
    choose_threshold,
    exceedance,
    feature_sums,
    pooled_reference,
    sidecar_reference,
    volume_features,
)
from common.task_models import build_plan_model
from common.weights import export_state
from server.checkpoint import save_checkpoint
from server.export import EXTRA_FILE, export_model
from sim.phantoms.ct import generate_case
from sim.phantoms.profiles import load_profile
from tests.fakes import TINY_PLAN, TINY_SCALE

PLAN = Plan.model_validate({**TINY_PLAN, "model": "unet-tiny"})
SYNTHETIC = {
    "synthetic-only": True,
    "sites": {"site-a": "synthetic", "site-b": "synthetic"},
    "pretrained-on": "synthetic",
}
REAL = {
    "synthetic-only": False,
    "sites": {"site-a": "real", "site-b": "synthetic"},
    "pretrained-on": "synthetic",
}


@pytest.fixture(scope="module")
def weights() -> dict:
    torch.manual_seed(0)
    return export_state(build_plan_model(PLAN))


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    case = generate_case(load_profile("thin-slice-cm"), seed=3, scale=TINY_SCALE)
    path = tmp_path_factory.mktemp("scans") / "scan.nii.gz"
    nib.save(nib.Nifti1Image(case.image, case.affine), str(path))
    return path


def _checkpoint(tmp: Path, weights: dict, **extra: Any) -> Path:
    """A checkpoint folder with the given extra sidecar keys."""
    sidecar = {"plan": PLAN.model_dump(by_alias=True, mode="json"), "model": "x"}
    save_checkpoint(tmp / "run" / "final", 1, weights, {**sidecar, **extra})
    return tmp / "run" / "final"


def _descrip(path: Path | str) -> str:
    return nib.load(str(path)).header["descrip"].item().decode()


@contextmanager
def _records(name: str) -> Iterator[list[str]]:
    """Messages logged to ``name`` (kidneyfl's loggers do not propagate)."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger, handler = logging.getLogger(name), Keep(logging.INFO)
    old = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def test_a_synthetic_only_model_says_so_everywhere(weights, scan, tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, weights, **{"training-data": SYNTHETIC})
    mask, js = tmp_path / "mask.nii.gz", tmp_path / "s.json"
    argv = ["predict", str(scan), "--checkpoint", str(ckpt), "-o", str(mask)]
    assert kidneyfl([*argv, "--json", str(js), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"WARNING (model): {SYNTHETIC_ONLY_WARNING}" in out
    summary = json.loads(js.read_text())
    assert summary["model-warnings"] == [SYNTHETIC_ONLY_WARNING]
    assert summary["training-data"] == SYNTHETIC
    assert summary["warnings"]["scan"] == [SYNTHETIC_ONLY_WARNING]
    case = summary["cases"]["scan"]
    assert case["warnings"] == [SYNTHETIC_ONLY_WARNING]
    assert case["warning-codes"] == ["synthetic"]
    want = "kidneyfl WARNING: synthetic-phantom model; not for real scans"
    assert _descrip(mask) == want
    assert np.allclose(nib.load(str(mask)).affine, nib.load(str(scan)).affine)


def test_a_model_trained_on_real_scans_warns_of_nothing(weights, scan, tmp_path):
    ckpt = _checkpoint(tmp_path, weights, **{"training-data": REAL})
    mask = tmp_path / "mask.nii.gz"
    summary = predict(ckpt, scan, output=mask, device="cpu")
    assert summary["model-warnings"] == [] and summary["warnings"] == {}
    assert "warnings" not in summary["cases"]["scan"]
    assert not any("WARNING" in line for line in summary_lines(summary))
    assert "kidneyfl WARNING" not in _descrip(mask)


def test_an_old_sidecar_says_nothing_and_scores_nothing(weights, scan, tmp_path):
    ckpt = _checkpoint(tmp_path, weights)  # neither training-data nor reference
    with _records("client.predict") as logged:
        summary = predict(ckpt, scan, device="cpu")
    assert summary["training-data"] is None and summary["model-warnings"] == []
    assert summary["ood-reference"] is None
    case = summary["cases"]["scan"]
    assert case["ood-score"] is None and case["ood-threshold"] is None
    assert sum("no calibrated out-of-distribution reference" in m for m in logged) == 1


def _scan_features(weights: dict, scan: Path, tmp: Path) -> np.ndarray:
    """The test scan's features, with the volumes this model predicts on it."""
    summary = predict(_checkpoint(tmp, weights), scan, device="cpu")
    volumes = volume_features(summary["cases"]["scan"]["volumes-ml"])
    image = check_scan(scan, PLAN, None).image_features
    return np.concatenate([image, volumes])


def _reference(rows_a: list, rows_b: list) -> dict:
    """What the coordinator would write: pooled sums of two sites, and a
    threshold calibrated on their validation shares."""
    ref = pooled_reference([feature_sums(rows_a), feature_sums(rows_b)])
    cal = choose_threshold(
        {"a": exceedance([0.2, 0.4]), "b": exceedance([0.3, 0.9, 1.1])},
        {"a": 2, "b": 3},
    )
    return sidecar_reference(ref, cal)


def test_a_scan_like_the_training_data_gets_no_ood_warning(weights, scan, tmp_path):
    own = _scan_features(weights, scan, tmp_path / "probe")
    reference = _reference([own, own], [own])
    ckpt = _checkpoint(tmp_path, weights, **{"ood-reference": reference})
    mask = tmp_path / "mask.nii.gz"
    summary = predict(ckpt, scan, output=mask, device="cpu")
    case = summary["cases"]["scan"]
    assert case["ood-score"] == pytest.approx(0.0, abs=1e-6)
    assert case["ood-threshold"] == reference["threshold"] == 1.5
    assert "warnings" not in case and summary["warnings"] == {}
    assert summary["ood-reference"]["calibrated-on"] == 5
    assert "kidneyfl WARNING" not in _descrip(mask)


def test_a_scan_far_from_the_training_data_is_flagged(weights, scan, tmp_path):
    own = _scan_features(weights, scan, tmp_path / "probe")
    far = own + 10 * np.asarray(STD_FLOOR)  # 10 floors off on every feature
    reference = _reference([far, far], [far])
    ckpt = _checkpoint(tmp_path, weights, **{"ood-reference": reference})
    mask, js = tmp_path / "mask.nii.gz", tmp_path / "s.json"
    summary = predict(ckpt, scan, output=mask, json_path=js, device="cpu")
    case = summary["cases"]["scan"]
    assert case["ood-score"] == pytest.approx(10.0, rel=1e-6)
    (why,) = case["warnings"]
    assert why.startswith(
        "unlike the training data: score 10.00 above the calibrated threshold 1.5 "
        "(features furthest off: "
    )
    assert case["warning-codes"] == ["ood"] and len(case["ood-furthest"]) == 3
    assert f"  WARNING: {why}" in summary_lines(summary)
    assert json.loads(js.read_text())["warnings"] == {"scan": [why]}
    assert _descrip(mask) == "kidneyfl WARNING: ood; input unlike training data"


def test_both_warnings_fit_every_written_nifti(weights, scan, tmp_path, monkeypatch):
    own = _scan_features(weights, scan, tmp_path / "probe")
    far = own + 10 * np.asarray(STD_FLOOR)
    extra = {"training-data": SYNTHETIC, "ood-reference": _reference([far], [far])}
    ckpt = _checkpoint(tmp_path, weights, **extra)
    real_get_task = predict_mod.get_task

    class WithUncertainty:
        """The segmentation task, also writing an uncertainty map beside the
        mask (as the task's next version does)."""

        def __init__(self, task: Any) -> None:
            self.task = task

        def predict(self, model, image, plan, device, output, **options) -> dict:
            res = self.task.predict(model, image, plan, device, output, **options)
            unc = Path(output).with_name("scan_uncertainty.nii.gz")
            src = nib.load(str(image))
            data = np.linspace(0, 1, int(np.prod(src.shape)), dtype=np.float32)
            nib.save(nib.Nifti1Image(data.reshape(src.shape), src.affine), str(unc))
            return {**res, "uncertainty-output": str(unc)}

    monkeypatch.setattr(
        predict_mod, "get_task", lambda name: WithUncertainty(real_get_task(name))
    )
    mask = tmp_path / "out" / "scan.nii.gz"
    summary = predict(ckpt, scan, output=mask, device="cpu")
    case = summary["cases"]["scan"]
    assert case["warning-codes"] == ["ood", "synthetic"]
    want = "kidneyfl WARNING: ood,synthetic-phantom model; not for real scans"
    unc = Path(case["uncertainty-output"])
    assert _descrip(mask) == want and _descrip(unc) == want
    values = np.asanyarray(nib.load(str(unc)).dataobj).ravel()
    assert values[0] == 0.0 and values[-1] == 1.0  # the map itself unchanged
    lines = summary_lines(summary)
    assert lines[0] == f"WARNING (model): {SYNTHETIC_ONLY_WARNING}"
    assert sum(SYNTHETIC_ONLY_WARNING in line for line in lines) == 1


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_export_carries_the_synthetic_warning(weights, tmp_path):
    own = np.zeros(len(STD_FLOOR))
    extra = {"training-data": SYNTHETIC, "ood-reference": _reference([own], [own])}
    ckpt = _checkpoint(tmp_path, weights, **extra)
    with _records("kidneyfl.server") as logged:
        paths = export_model(ckpt, tmp_path / "e")
    assert any(SYNTHETIC_ONLY_WARNING in m for m in logged)
    desc = json.loads(paths["preprocessing"].read_text())
    assert desc["warnings"] == [SYNTHETIC_ONLY_WARNING]
    assert desc["training-data"] == SYNTHETIC
    assert desc["ood-reference"]["threshold"] == 1.5
    files = {EXTRA_FILE: ""}
    torch.jit.load(str(paths["model"]), _extra_files=files)
    assert json.loads(files[EXTRA_FILE])["warnings"] == [SYNTHETIC_ONLY_WARNING]
    # A model trained on real scans exports without one.
    real = _checkpoint(tmp_path / "r", weights, **{"training-data": REAL})
    desc = json.loads(export_model(real)["preprocessing"].read_text())
    assert desc["warnings"] == [] and desc["ood-reference"] is None
