"""Every released validation number describes at least the site's floor of
patients (client/disclosure.py): per region, per class, and through the whole
evaluate path of a phantom site."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from client import app as site_app
from client.contract import check_reply, expected_arrays
from client.disclosure import (
    ALL_CLASSES,
    class_denominator,
    denominator,
    denominator_counts,
    release,
)
from client.edge import reply_view
from client.tasks.base import TaskData
from client.tasks.classification.data import SliceDataset
from client.tasks.classification.task import ClassificationTask
from client.tasks.segmentation.cases import load_site_cases
from common import wire
from common.cls_metrics import classification_metrics
from common.config import Plan, load_site_config
from common.metrics import REPORT_REGIONS, summarise_cases
from common.models import build_model
from common.task_models import build_plan_model
from sim.phantoms.sites import write_site_phantom
from tests.fakes import (
    DEFAULT_PRIVACY,
    TINY_PLAN,
    cls_plan,
    site_context,
    site_message,
    write_cls_yaml,
    write_site_yaml,
)

NAMES = ("normal", "cyst", "tumour", "stone")

# -- segmentation: per region -------------------------------------------------

_case = st.fixed_dictionaries(
    {
        name: st.tuples(
            st.floats(0.0, 1.0), st.booleans(), st.sampled_from([0.0, 0.5, 12.0])
        )
        for name in REPORT_REGIONS
    }
)


def _seg_count(rows, key: str) -> int:
    """The patients behind ``key``, counted from the cases, not from the rule."""
    for prefix, present in (
        ("surface-dice-", True),
        ("dice-", True),
        ("fp-rate-", False),
        ("fp-ml-", False),
        ("cases-no-", False),
        ("cases-", True),
    ):
        if key.startswith(prefix):
            region = key.removeprefix(prefix)
            return sum(r[region][1] == present for r in rows)
    assert key == wire.EVAL_LOSS
    return len(rows)


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(_case, min_size=1, max_size=12), floor=st.integers(1, 8))
def test_no_segmentation_key_below_the_floor(rows, floor):
    metrics = summarise_cases(rows)
    for region in ("kidney", "masses", "tumour"):  # as the task adds them
        if f"dice-{region}" in metrics:
            metrics[wire.surface_dice_key(region)] = metrics[f"dice-{region}"] / 2
    metrics[wire.EVAL_LOSS] = 0.7
    out = release(metrics, denominator_counts(metrics, len(rows), {}), floor)
    for key, value in metrics.items():
        if _seg_count(rows, key) >= floor:
            assert out[key] == value  # released unchanged
        else:
            assert key not in out
    assert set(out) <= set(metrics)


def test_one_tumour_patient_withholds_its_dice_keeps_its_false_positives():
    rows = [
        {
            n: (0.9, True, 5.0) if n == "kidney" else (1.0, False, 0.0)
            for n in REPORT_REGIONS
        }
        for _ in range(4)
    ]
    rows[0]["tumour"] = (0.42, True, 3.0)
    metrics = summarise_cases(rows)
    out = release(metrics, denominator_counts(metrics, 4, {}), 3)
    assert "dice-tumour" not in out and "cases-tumour" not in out
    assert out["fp-rate-tumour"] == 0.0 and out["cases-no-tumour"] == 3
    assert out["dice-kidney"] == pytest.approx(0.9) and "cases-no-kidney" not in out


# -- classification: per class ------------------------------------------------


@st.composite
def _validation(draw):
    n = draw(st.integers(1, 30))
    y = draw(st.lists(st.integers(0, len(NAMES) - 1), min_size=n, max_size=n))
    logits = draw(
        st.lists(
            st.lists(st.floats(-3, 3), min_size=len(NAMES), max_size=len(NAMES)),
            min_size=n,
            max_size=n,
        )
    )
    p = np.exp(np.asarray(logits))
    return np.asarray(y), p / p.sum(1, keepdims=True)


@settings(max_examples=150, deadline=None)
@given(data=_validation(), floor=st.integers(1, 8))
def test_no_classification_key_below_the_floor(data, floor):
    y, probs = data
    metrics = classification_metrics(y, probs, NAMES)
    metrics[wire.EVAL_LOSS] = 1.3
    per_class = np.bincount(y, minlength=len(NAMES))  # one slice per patient
    counts = {
        class_denominator(c): int(k) for c, k in zip(NAMES, per_class, strict=True)
    }
    out = release(metrics, denominator_counts(metrics, len(y), counts), floor)
    present = per_class[per_class > 0]
    every_class = bool(present.min() >= floor)
    for key, value in metrics.items():
        if key.startswith((wire.RECALL_PREFIX, wire.CONFUSION_PREFIX)):
            name = key.removeprefix(wire.RECALL_PREFIX).removeprefix("cm-")
            ok = per_class[NAMES.index(name.split("-")[0])] >= floor
        elif key in (wire.ACCURACY, wire.BALANCED_ACCURACY, wire.AUC_MACRO):
            ok = every_class
        else:
            ok = len(y) >= floor
        assert (out.get(key) == value) if ok else key not in out, key
    # a confusion row goes whole or not at all
    for c in NAMES:
        row = {k for k in metrics if k.startswith(f"cm-{c}-")}
        assert row <= set(out) or not row & set(out)


def test_rare_class_withholds_its_row_and_the_all_class_scores():
    y = np.array([0] * 6 + [1] * 5 + [3])  # one stone patient
    probs = np.eye(4)[[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0]] * 0.6 + 0.1
    metrics = classification_metrics(y, probs, NAMES)
    counts = {
        class_denominator(c): int(k)
        for c, k in zip(NAMES, np.bincount(y, minlength=4), strict=True)
    }
    out = release(metrics, denominator_counts(metrics, len(y), counts), 5)
    assert not [k for k in out if k.startswith("cm-stone-") or k == "recall-stone"]
    assert not [k for k in out if k.startswith("cm-tumour-")]  # no tumour patient
    assert out["recall-normal"] == metrics["recall-normal"]
    assert {f"cm-normal-{p}" for p in NAMES} <= set(out)
    # accuracy times 12 minus the released diagonal would be the stone
    # patient's outcome: withheld with balanced accuracy and macro AUC
    for key in (wire.ACCURACY, wire.BALANCED_ACCURACY, wire.AUC_MACRO):
        assert key in metrics and key not in out


def test_unknown_keys_are_withheld_and_named_in_the_log(caplog):
    metrics = {"dice-kidney": 0.8, "cases-kidney": 9.0, "hausdorff-kidney": 3.0}
    counts = denominator_counts(metrics, 9, {})
    with caplog.at_level(logging.INFO, logger="kidneyfl.client"):
        out = release(metrics, counts, 5)
    assert out == {"dice-kidney": 0.8, "cases-kidney": 9.0}
    assert denominator("hausdorff-kidney") is None
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "hausdorff-kidney" in logged and "3.0" not in logged  # names, no values
    assert denominator("cm-cyst-stone") == class_denominator("cyst")  # the row
    assert denominator(wire.AUC_MACRO) == ALL_CLASSES


def test_classification_counts_patients_not_slices():
    # patients: [0, 0, 0] (normal, 3 slices), [1] cyst, [2, 0] (tumour and normal)
    labels = torch.tensor([0, 0, 0, 1, 2, 0])
    ds = SliceDataset(torch.rand(6, 1, 8, 8), labels, patients=[[0, 1, 2], [3], [4, 5]])
    data = TaskData(ds, ds, 3, 3, "x")
    counts = ClassificationTask().denominators(data, cls_plan())
    assert counts == {
        "class-normal": 2,
        "class-cyst": 1,
        "class-tumour": 1,
        "class-stone": 0,
    }


# -- the evaluate path on a phantom site ----------------------------------------


def _one_tumour_in_validation(tmp_path):
    """A phantom site (floor 2) whose 3 validation cases hold one tumour."""
    privacy = {
        "enabled": True,
        "max_epsilon": 100.0,
        "delta": 1e-3,
        "min_cases_for_aggregates": 2,
    }
    path = write_site_yaml(tmp_path, "a", cases=8, privacy=privacy)
    validation = load_site_cases(load_site_config(path)).validation
    assert len(validation) == 3
    for i, case in enumerate(validation):
        img = nib.load(case.label)
        lab = np.asarray(img.dataobj).astype(np.uint8)
        if i == 0:
            lab[lab == 1] = 2  # a large tumour that survives resampling
        else:
            lab[lab == 2] = 1
        nib.save(nib.Nifti1Image(lab, img.affine, img.header), case.label)
    return path


@pytest.mark.usefixtures("task_identity")
def test_evaluate_reply_leaves_out_the_one_patient_tumour_dice(tmp_path, site_records):
    path = _one_tumour_in_validation(tmp_path)
    plan = {**TINY_PLAN, "model": "unet-tiny"}
    arrays = ArrayRecord(build_model("unet-tiny").state_dict())
    reply = site_app.evaluate(
        site_message("evaluate", arrays, 1), site_context(path, plan)
    )
    m = dict(reply.content[wire.METRICS])
    assert m.get(wire.REFUSED, 0) == 0 and wire.METRICS_WITHHELD not in m
    assert m[wire.NUM_VAL_CASES] == 3
    assert "dice-kidney" in m and "surface-dice-kidney" in m and wire.EVAL_LOSS in m
    assert "dice-tumour" not in m and "surface-dice-tumour" not in m
    assert "cases-tumour" not in m
    assert m["cases-no-tumour"] == 2 and "fp-rate-tumour" in m
    logged = " ".join(r.getMessage() for r in site_records.records)
    assert "dice-tumour" in logged
    full = Plan.model_validate(plan)
    problems = check_reply(
        reply_view(reply), "a", full.task, expected_arrays(full), len(full.class_names)
    )
    assert problems == []


@pytest.mark.usefixtures("task_identity")
def test_classification_evaluate_reply_holds_each_class_to_the_floor(tmp_path):
    privacy = {**DEFAULT_PRIVACY, "min_cases_for_aggregates": 2}
    mix = {"normal": 4, "cyst": 4, "tumour": 4, "stone": 1}  # stone is rare
    path = write_cls_yaml(tmp_path, "c", cases=24, mix=mix, privacy=privacy)
    site = load_site_config(path)
    write_site_phantom(site)
    run_config = {
        "task": "classification",
        "model": "resnet-tiny",
        "hu-window": "-100,400",
        "image-size": 32,
    }
    plan = Plan.model_validate(run_config)
    task = ClassificationTask()
    counts = task.denominators(task.load_data(site, plan), plan)
    assert counts["class-stone"] < 2 <= counts["class-normal"]  # both branches
    arrays = ArrayRecord(build_plan_model(plan).state_dict())
    reply = site_app.evaluate(
        site_message("evaluate", arrays, 1), site_context(path, run_config)
    )
    m = dict(reply.content[wire.METRICS])
    assert m.get(wire.REFUSED, 0) == 0 and wire.EVAL_LOSS in m
    for name in plan.class_names:
        row = {k for k in m if k.startswith(f"cm-{name}-")}
        if counts[class_denominator(name)] >= 2:
            assert len(row) == len(plan.class_names)
            assert wire.recall_key(name) in m
        else:
            assert not row and wire.recall_key(name) not in m
    every = min(v for v in counts.values() if v) >= 2
    for key in (wire.ACCURACY, wire.BALANCED_ACCURACY, wire.AUC_MACRO):
        assert (key in m) == every
    assert not every or any(k.startswith("cm-") for k in m)
    problems = check_reply(
        reply_view(reply), "c", plan.task, expected_arrays(plan), len(plan.class_names)
    )
    assert problems == []
