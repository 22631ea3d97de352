"""The run report: spread per metric, HTML with embedded plots, TensorBoard."""

from __future__ import annotations

import base64
import html
import io
import json
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from common.config import Plan
from common.task_models import build_plan_model
from server.reporting.figures import confusion_matrices
from server.reporting.html import write_report
from server.reporting.metrics_log import round_entry, round_line
from server.reporting.round_record import RoundRecord
from server.reporting.tensorboard_log import write_events
from sim.samples import is_phantom_site, phantom_samples
from tests.fakes import RUN_SITES, round_record, write_run, write_site_yaml


def test_spread_is_best_minus_worst_for_every_score():
    entry = round_entry(round_record(2, cm=True))
    sp = entry["spread"]
    assert sp["dice-kidney"] == pytest.approx(0.1)
    assert sp["dice-masses"] == pytest.approx(0.05)
    assert sp["surface-dice-kidney"] == pytest.approx(0.1 / 1.5)
    assert sp["eval-loss"] == 0.0
    assert not any(k.startswith("cm-") or k.startswith("num-") for k in sp)
    assert "best-worst 0.100/0.050/0.033" in round_line(entry)


def _pngs(page: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


def test_report_sections_and_embedded_images(tmp_path):
    run = write_run(tmp_path, cm=True)
    comparison = {
        "metric": "dice-kidney",
        "models": ["federated", "local-hospital-a", "pooled"],
        "sites": list(RUN_SITES),
        "values": {
            "federated": {s: {"dice-kidney": 0.7} for s in RUN_SITES},
            "local-hospital-a": {"hospital-a": {"dice-kidney": 0.8}},  # one missing
            "pooled": {s: {"dice-kidney": 0.75} for s in RUN_SITES},
        },
    }
    (run / "comparison.json").write_text(json.dumps(comparison))
    page = write_report(run).read_text()
    ids = re.findall(r'<h2 id="([a-z]+)"', page)
    for section in ("final", "curves", "loss", "privacy", "spread", "comparison"):
        assert section in ids
    assert "confusion" in ids and "samples" not in ids  # no phantom slices given
    assert "http://" not in page and "https://" not in page
    assert "<script src" not in page and page.count("<script>") == 1  # inline check
    assert "hospital-c" in page and "ceiling" in page  # the refusal is listed
    assert html.escape('["benign", "malignant"]') in page  # plan table: JSON
    pngs = _pngs(page)
    files = sorted(p.name for p in (run / "report").glob("*.png"))
    # dice, surface dice, loss, epsilon, spread, comparison, 2 sites + all sites
    assert len(pngs) == len(files) == 9
    for png in pngs:
        img = Image.open(io.BytesIO(png))
        assert img.format == "PNG" and img.width > 200 and img.height > 150
        assert np.asarray(img).std() > 0  # not a blank canvas
    assert "comparison.png" in files and "epsilon.png" in files


def test_report_without_dp_has_no_privacy_plot(tmp_path):
    run = write_run(tmp_path, rounds=2, dp=False)
    page = write_report(run).read_text()
    assert 'id="privacy"' not in page and 'id="comparison"' not in page
    assert 'id="curves"' in page and ">off<" in page  # epsilon column says off


def test_confusion_matrix_from_metric_keys():
    cms = confusion_matrices(round_entry(round_record(1, cm=True)))
    assert set(cms) == {*RUN_SITES, "all sites"}
    assert cms["hospital-b"].tolist() == [[5.0, 2.0], [2.0, 4.0]]
    assert cms["all sites"].tolist() == [[10.0, 3.0], [4.0, 8.0]]


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    run = write_run(tmp_path, rounds=2)
    from server.reporting.metrics_log import read_metrics

    out = write_events(run, read_metrics(run))
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "evaluate/dice-kidney/hospital-a" in tags
    assert "epsilon/hospital-b" in tags and "spread/dice-kidney" in tags
    vals = [e.value for e in acc.Scalars("evaluate/dice-kidney/hospital-b")]
    assert vals == pytest.approx([0.3, 0.5])


def test_sample_slices_only_from_phantom_sites(tmp_path):
    phantom = write_site_yaml(tmp_path, "sim", cases=3)
    # Same files, but the YAML does not declare phantom data: never rendered.
    doc = yaml.safe_load(phantom.read_text())
    doc.pop("phantom")
    doc["name"] = "real"
    real = tmp_path / "real.yaml"
    real.write_text(yaml.safe_dump(doc))
    assert is_phantom_site(phantom) and not is_phantom_site(real)
    plan = Plan.model_validate(
        {"model": "unet-small", "spacing-mm": "8,8,10", "patch-size": "32,32,16"}
    )
    model = build_plan_model(plan)
    samples, skipped = phantom_samples([phantom, real], model, plan)
    assert [s.site for s in samples] == ["sim"] and skipped == ["real"]
    s = samples[0]
    assert s.image.shape == s.pred.shape == s.truth.shape and s.truth.any()
    run = write_run(tmp_path)
    page = write_report(run, samples, skipped).read_text()
    assert 'id="samples"' in page and "No sample slice for real" in page


def test_report_command_prints_lines_and_writes_html(tmp_path, capsys):
    from cli.main import main as kidneyfl

    run = write_run(tmp_path, rounds=2)
    assert kidneyfl(["report", str(run), "--no-samples"]) == 0
    out = capsys.readouterr().out
    assert "round   2 |" in out and "best-worst" in out
    assert (run / "report.html").is_file() and (run / "tensorboard").is_dir()


def test_classification_rounds_report_balanced_accuracy_not_dice():
    from server.reporting.metrics_log import summary_table

    rec = RoundRecord(round=1)
    rec.evaluate = {
        "a": {
            "balanced-accuracy": 0.6,
            "accuracy": 0.7,
            "auc-macro": 0.8,
            "num-val-cases": 10,
        },
        "b": {
            "balanced-accuracy": 0.4,
            "accuracy": 0.5,
            "auc-macro": 0.6,
            "num-val-cases": 30,
        },
    }
    entry = round_entry(rec)
    line = round_line(entry)
    assert "Dice" not in line
    assert "balanced-acc/acc/auc 0.450/0.550/0.650" in line  # case-weighted
    assert "a: bal-acc 0.600" in line and "b: bal-acc 0.400" in line
    table = summary_table([entry])
    assert "balanced-accuracy" in table and "dice" not in table


def test_confusion_matrix_from_class_named_keys():
    rec = RoundRecord(round=1)
    rec.evaluate = {
        "a": {
            "cm-cyst-cyst": 3,
            "cm-cyst-stone": 1,
            "cm-stone-stone": 2,
            "num-val-cases": 6,
        },
    }
    cms = confusion_matrices(round_entry(rec), ["normal", "cyst", "tumour", "stone"])
    mat = cms["a"]
    assert mat[1, 1] == 3 and mat[1, 3] == 1 and mat[3, 3] == 2
    # rows the site did not send (withheld below its floor) are blank, not 0
    assert np.isnan(mat[[0, 2]]).all() and np.nansum(mat) == 6


def test_round_line_says_when_a_site_withholds_and_shows_tumour_false_positives():
    from server.reporting.metrics_log import round_line

    entry = {
        "round": 3,
        "weighted": {
            "dice-kidney": 0.8,
            "dice-masses": 0.4,
            "dice-tumour": 0.3,
            "fp-rate-tumour": 0.25,
        },
        "evaluate": {
            "a": {"dice-kidney": 0.81, "num-val-cases": 40},
            "b": {"metrics-withheld": 1, "num-val-cases": 3},
        },
        "epsilon": {"a": 4.0, "b": 4.1},
    }
    line = round_line(entry)
    assert "tumour FP 0.25" in line
    assert "a: kidney 0.810 eps=4.00" in line
    assert "b: metrics withheld (site choice) eps=4.10" in line
    assert "b: kidney 0.000" not in line


def test_the_pretrained_start_is_the_summary_s_reference(tmp_path):
    """A run from a pretrained model shows that model's metrics at each site
    (round 0) and the summary compares the last round with it, not round 1."""
    from server.reporting.metrics_log import read_start, summary_table, write_start

    start = RoundRecord(round=0)
    start.evaluate = {"a": {"dice-kidney": 0.80, "num-val-cases": 10}}
    entry = write_start(tmp_path, start)
    line = round_line(entry)
    assert line.startswith("start     | Dice") and "a: kidney 0.800" in line
    assert "eps=" not in line and "NOT AGGREGATED" not in line
    assert read_start(tmp_path)["evaluate"] == entry["evaluate"]
    last = RoundRecord(round=5)
    last.evaluate = {"a": {"dice-kidney": 0.90, "num-val-cases": 10}}
    first = RoundRecord(round=1)
    first.evaluate = {"a": {"dice-kidney": 0.10, "num-val-cases": 10}}
    rounds = [round_entry(first), round_entry(last)]
    table = summary_table(rounds, read_start(tmp_path))
    assert "(the starting model in brackets)" in table and "0.900 (0.800)" in table
    assert "0.900 (0.100)" in summary_table(rounds)  # no start: round 1
    (tmp_path / "start-evaluation.json").write_text("{torn")
    assert read_start(tmp_path) is None  # the summary falls back to round 1


def test_a_key_a_site_withholds_adds_nothing_to_its_mean():
    # site b has one tumour patient and one stone patient: below its floor it
    # sends no dice-tumour / cases-tumour, no stone row and no all-class score
    from server.reporting.metrics_log import summary_table
    from server.reporting.round_record import weighted_eval_means

    seg = {
        "a": {
            "dice-kidney": 0.8,
            "cases-kidney": 10,
            "dice-tumour": 0.5,
            "cases-tumour": 6,
            "fp-rate-tumour": 0.25,
            "cases-no-tumour": 4,
            "num-val-cases": 10,
        },
        "b": {
            "dice-kidney": 0.6,
            "cases-kidney": 10,
            "fp-rate-tumour": 0.0,
            "cases-no-tumour": 9,
            "num-val-cases": 10,
        },
    }
    means = weighted_eval_means(seg)
    assert means["dice-tumour"] == 0.5 and means["cases-tumour"] == 6
    assert means["dice-kidney"] == pytest.approx(0.7)
    assert means["fp-rate-tumour"] == pytest.approx(0.25 * 4 / 13)
    rec = RoundRecord(round=1)
    rec.evaluate = seg
    line = round_line(round_entry(rec))
    assert "a: kidney 0.800" in line and "b: kidney 0.600" in line

    rec = RoundRecord(round=1)
    rec.evaluate = {
        "a": {
            "accuracy": 0.5,
            "balanced-accuracy": 0.5,
            "recall-normal": 0.5,
            "cm-normal-normal": 3,
            "cm-normal-stone": 3,
            "cm-stone-normal": 3,
            "cm-stone-stone": 3,
            "num-val-cases": 12,
        },
        "b": {  # the stone row and the all-class scores withheld
            "recall-normal": 1.0,
            "cm-normal-normal": 6,
            "cm-normal-stone": 0,
            "num-val-cases": 7,
        },
    }
    entry = round_entry(rec)
    assert entry["weighted"]["balanced-accuracy"] == 0.5  # a's alone
    assert entry["weighted"]["recall-normal"] == pytest.approx((6 + 7) / 19)
    line = round_line(entry)
    assert "Dice" not in line and "b: bal-acc n/a" in line
    assert "balanced-accuracy" in summary_table([entry])
    cms = confusion_matrices(entry, ["normal", "stone"])
    assert np.isnan(cms["b"][1]).all() and cms["b"][0].tolist() == [6, 0]
    assert cms["all sites"].tolist() == [[9, 3], [3, 3]]  # b's row adds nothing
    # nor when no site sends balanced accuracy: still a classification run
    for m in rec.evaluate.values():
        for key in ("balanced-accuracy", "accuracy"):
            m.pop(key, None)
    assert "Dice" not in round_line(round_entry(rec))
