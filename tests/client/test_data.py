import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from client.data.errors import SiteDataError
from client.data.layouts import discover
from client.tasks.segmentation.cases import load_site_cases
from client.tasks.segmentation.pipeline import PatchDataset, volume_dataset
from client.tasks.segmentation.task import SegmentationTask
from common.config import load_site_config
from tests.fakes import write_site_yaml


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
    from common.task_models import build_plan_model

    task = SegmentationTask()
    data = task.load_data(tiny_site, tiny_plan)
    out = task.evaluate(
        build_plan_model(tiny_plan), data, tiny_plan, torch.device("cpu")
    )
    regions = ("kidney", "masses", "tumour")
    # one value per region and kind (docs/evaluation.md), never one per case
    prefixes = ("dice-", "surface-dice-", "cases-", "fp-rate-", "fp-ml-")
    prefixes += ("lesion-sens-", "detect-", "fp-lesions-", "froc-")
    assert all(k == "eval-loss" or k.startswith(prefixes) for k in out), out
    assert "fp-lesions-tumour" in out  # lesion level over every case
    assert {f"surface-dice-{r}" for r in regions} | {"eval-loss"} <= set(out)
    assert all(0.0 <= out[f"surface-dice-{r}"] <= 1.0 for r in regions)
    assert out["cases-kidney"] + out["cases-no-kidney"] == data.n_val
    assert all(isinstance(v, float) for v in out.values())


def _relist(site_yaml, rows):
    """The phantom site re-listed in a manifest: (case, split, patient) rows."""
    root = load_site_config(site_yaml).data.root
    lines = ["image,label,split,patient"]
    for case, split, patient in rows:
        d = f"case_{case:05d}"
        lines.append(f"{d}/imaging.nii.gz,{d}/segmentation.nii.gz,{split},{patient}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return load_site_config(site_yaml)


def test_manifest_patient_column_one_case_per_patient(tmp_path):
    site_yaml = write_site_yaml(tmp_path, "h", cases=5)
    rows = [(i, "", f"p{i}") for i in range(5)]
    cases = load_site_cases(_relist(site_yaml, rows))
    assert {c.patient_id for c in cases.train + cases.validation} == {
        f"p{i}" for i in range(5)
    }
    rows[3] = (3, "", "p1")  # two scans of patient p1
    with pytest.raises(SiteDataError) as err:
        load_site_cases(_relist(site_yaml, rows))
    msg = str(err.value)
    assert "patient p1 has 2 cases" in msg
    assert "case_00001/imaging.nii.gz" in msg and "case_00003/imaging.nii.gz" in msg
    assert "data.exclude_cases" in msg


def test_identical_images_are_refused_and_exclusion_fixes_it(tmp_path):
    site_yaml = write_site_yaml(tmp_path, "h", cases=4)
    root = load_site_config(site_yaml).data.root
    shutil.copytree(root / "case_00002", root / "case_00009")  # a copied case
    with pytest.raises(SiteDataError, match="identical images") as err:
        load_site_cases(load_site_config(site_yaml))
    assert "case_00002" in str(err.value) and "case_00009" in str(err.value)
    doc = yaml.safe_load(site_yaml.read_text())
    doc["data"]["exclude_cases"] = ["case_00009"]
    site_yaml.write_text(yaml.safe_dump(doc))
    cases = load_site_cases(load_site_config(site_yaml))
    assert cases.skipped == {"case_00009": "left out by data.exclude_cases"}
    assert len(cases.train) + len(cases.validation) == 4
    doc["data"]["exclude_cases"] = ["case_0009"]  # a typo is not silently ignored
    site_yaml.write_text(yaml.safe_dump(doc))
    with pytest.raises(SiteDataError, match=r"exclude_cases names \['case_0009'\]"):
        load_site_cases(load_site_config(site_yaml))


def test_patient_in_training_and_validation_is_refused(tmp_path):
    site_yaml = write_site_yaml(tmp_path, "h", cases=4)
    rows = [(0, "train", "a"), (1, "validation", "a"), (2, "train", "b")]
    rows.append((3, "validation", "c"))
    with pytest.raises(SiteDataError, match="patient a is in both training and"):
        load_site_cases(_relist(site_yaml, rows))
    # the same case named in both of the YAML's lists is the same mistake
    doc = yaml.safe_load(site_yaml.read_text())
    doc["data"].update(train_cases=["case_00000", "case_00001"])
    doc["data"].update(validation_cases=["case_00001", "case_00002"])
    site_yaml.write_text(yaml.safe_dump(doc))
    (load_site_config(site_yaml).data.root / "manifest.csv").unlink()
    with pytest.raises(SiteDataError, match="case_00001 is in both training"):
        load_site_cases(load_site_config(site_yaml))


def test_evaluate_candidates_are_on_the_contract(tiny_site, tiny_plan):
    """Every post-processing candidate's metrics, each a key the site's own
    contract lets leave and the coordinator's weights by its denominator."""
    from common.contract import allowed_metric, max_metric_keys, value_problems
    from common.postprocess import CANDIDATES, CHOICE_KEYS
    from common.task_models import build_plan_model

    task = SegmentationTask()
    data = task.load_data(tiny_site, tiny_plan)
    model = build_plan_model(tiny_plan)
    out = task.evaluate(model, data, tiny_plan, torch.device("cpu"), candidates=True)
    for i in range(len(CANDIDATES)):
        assert f"pp{i}-dice-kidney" in out
        assert f"pp{i}-fp-lesions-tumour" in out
    assert all(allowed_metric(k, "evaluate", "segmentation") for k in out), out
    assert len(out) <= max_metric_keys("evaluate", "segmentation", 4)
    assert value_problems(out, 1000) == []
    # "none" is the plain evaluation, key for key
    plain = task.evaluate(model, data, tiny_plan, torch.device("cpu"))
    for key in CHOICE_KEYS:
        if key in plain:
            assert out[f"pp0-{key}"] == pytest.approx(plain[key])
