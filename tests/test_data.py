import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from client.data import (
    PatchDataset,
    SiteDataError,
    load_site_cases,
    volume_dataset,
)
from client.layouts import discover
from client.segmentation import SegmentationTask
from common.config import load_site_config
from tests.conftest import write_site_yaml


def test_discovers_kits_cases_and_splits_deterministically(tiny_site):
    found = discover(tiny_site.data.root, "kits23").cases
    assert [c.case_id for c in found] == [f"case_{i:05d}" for i in range(6)]
    a, b = load_site_cases(tiny_site), load_site_cases(tiny_site)
    assert [c.case_id for c in a.validation] == [c.case_id for c in b.validation]
    assert len(a.train) == 4 and len(a.validation) == 2
    assert not {c.case_id for c in a.train} & {c.case_id for c in a.validation}
    assert a.fingerprint() == b.fingerprint()


def _break(case_dir, how):
    img, seg = case_dir / "imaging.nii.gz", case_dir / "segmentation.nii.gz"
    if how == "truncated":
        img.write_bytes(img.read_bytes()[:200])
    elif how == "label7":
        s = nib.load(str(seg))
        data = np.asanyarray(s.dataobj).copy()
        data[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(data, s.affine), str(seg))
    elif how == "shape":
        s = nib.load(str(seg))
        data = np.asanyarray(s.dataobj)[:-1]
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), s.affine), str(seg))
    elif how == "nolabel":
        seg.unlink()


@pytest.mark.parametrize(
    "how, words",
    [
        ("truncated", "truncated"),
        ("label7", "[7]"),
        ("shape", "label shape"),
        ("nolabel", "no segmentation"),
    ],
)
def test_bad_case_is_skipped_with_its_reason(tmp_path, how, words):
    site = load_site_config(write_site_yaml(tmp_path, "h", cases=5))
    _break(site.data.root / "case_00002", how)
    cases = load_site_cases(site)
    assert "case_00002" in cases.skipped
    assert words in cases.skipped["case_00002"]
    assert len(cases.train) + len(cases.validation) == 4


def test_site_without_usable_cases_refuses(tmp_path):
    site = load_site_config(write_site_yaml(tmp_path, "h", cases=2))
    _break(site.data.root / "case_00000", "truncated")
    with pytest.raises(SiteDataError, match="usable labelled case"):
        load_site_cases(site)
    shutil.rmtree(site.data.root)
    with pytest.raises(SiteDataError, match="does not exist"):
        load_site_cases(site)


def test_pipeline_resamples_windows_and_patches(tiny_site, tiny_plan):
    cases = load_site_cases(tiny_site)
    vols = volume_dataset(cases.validation, tiny_site, tiny_plan)
    item = vols[0]
    img, lab = item["image"], item["label"]
    assert img.shape[0] == 1 and img.shape == lab.shape
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert set(torch.unique(lab).tolist()) <= {0, 1, 2, 3}
    patches = PatchDataset(volume_dataset(cases.train, tiny_site, tiny_plan), tiny_plan)
    x, y = patches[0]
    assert x.shape == (1, 32, 32, 16) and y.shape == (1, 32, 32, 16)
    assert x.dtype == torch.float32 and y.dtype == torch.long


def test_task_evaluate_returns_aggregates_only(tiny_site, tiny_plan):
    from common.tasks import build_plan_model

    task = SegmentationTask()
    data = task.load_data(tiny_site, tiny_plan)
    out = task.evaluate(
        build_plan_model(tiny_plan), data, tiny_plan, torch.device("cpu")
    )
    regions = ("kidney", "masses", "tumour")
    assert set(out) == {
        *(f"dice-{r}" for r in regions),
        *(f"surface-dice-{r}" for r in regions),
        "eval-loss",
    }
    assert all(0.0 <= out[f"surface-dice-{r}"] <= 1.0 for r in regions)
    assert all(isinstance(v, float) for v in out.values())
