"""The utility benchmark's tables and merged results (docs/utility.md is
written from them: a wrong gain or a silent merge of incomparable runs would
misreport what privacy costs)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCH))  # run as files, as the docs say
    try:
        yield (
            importlib.import_module("utility"),
            importlib.import_module("utility_table"),
        )
    finally:
        sys.path.remove(str(BENCH))


def _row(k: float, t: float, **extra) -> dict:
    sites = {
        s: {"dice-kidney": k, "dice-tumour": t}
        for s in ("hospital-thin", "hospital-standard", "hospital-thick")
    }
    return {"sites": sites, "wall_s": 60.0, "steps": 180, **extra}


def test_gain_is_against_the_row_each_federation_started_from(scripts):
    _, table = scripts
    out = {
        "rows": {
            "pretrained": {"0": _row(0.80, 0.50)},
            "pretrained (720 steps)": {"0": _row(0.85, 0.60), "1": _row(0.87, 0.62)},
            "pretrained (720 steps) + lr": {
                "0": _row(0.90, 0.70, base="pretrained (720 steps)"),
                "1": _row(0.90, 0.70, base="pretrained (720 steps)"),
            },
        }
    }
    text = table.table(out)
    # mean over seeds of (0.90 - 0.85, 0.90 - 0.87) = +0.040; tumour +0.090
    assert "| pretrained (720 steps) + lr | +0.040 / +0.090 / - |" in text
    assert "| pretrained (720 steps) + lr | 0.900 ± 0.000 | 0.700 ± 0.000 |" in text
    assert "| 180 | 2 |" in text  # the seeds behind each row are shown


def test_merge_refuses_runs_that_are_not_comparable(scripts):
    utility, _ = scripts
    config = {
        "quick": False, "split": "validation", "sizes": {"train": 120},
        "plan": {"model": "unet-tiny"}, "steps_per_site": 60,
        "reference_epsilon": 8.0, "seeds": [0, 1], "recipes": {"a": {}},
        "pretrained_recipes": {}, "rows": ["reference"], "started": "x",
        "device": "cpu", "phantom_s": 1.0,
    }  # fmt: skip
    earlier = {"config": config, "rows": {"fedavg": {"0": _row(0.7, 0.2)}}}
    new = {"config": config | {"seeds": [2], "recipes": {"b": {}}}, "rows": {}}
    merged = utility._merged(earlier, new, "old.json")
    assert merged["config"]["seeds"] == [0, 1, 2]
    assert set(merged["config"]["recipes"]) == {"a", "b"}
    assert merged["rows"]["fedavg"]["0"]["sites"]  # earlier rows kept
    other = {"config": config | {"plan": {"model": "unet-small"}}, "rows": {}}
    with pytest.raises(ValueError, match="differs in plan"):
        utility._merged(earlier, other, "old.json")


def test_plot_curves_take_their_own_rows_at_integer_epsilons(scripts):
    # the plot docs/utility.md opens with: a curve must not pick up another
    # recipe's rows or the accounting row (6.9), and must be ordered by epsilon
    _, table = scripts
    pts = {
        "fedavg DP eps=8": (0.5, 0.04),
        "fedavg DP eps=1": (0.0, 0.0),
        "fedavg DP eps=6.9": (0.45, 0.07),
        "pretrained (720 steps) + fedavg DP eps=3 lr 0.003": (0.88, 0.01),
        "pretrained (720 steps) + fedavg DP eps=8 lr 0.003": (0.90, 0.01),
        "pretrained (720 steps) + fedavg DP eps=8 lr 0.01": (0.89, 0.01),
        "pretrained (720 steps) + fedavg DP eps=8 biases only": (0.88, 0.01),
    }
    scratch, public = (table.curve(pts, c[1], c[2]) for c in table.CURVES)
    assert scratch == [(1.0, 0.0, 0.0), (8.0, 0.5, 0.04)]
    assert public == [(3.0, 0.88, 0.01), (8.0, 0.90, 0.01)]


def test_pretrained_curve_reuses_the_saved_federation_instead_of_overwriting_it(
    scripts, tmp_path, monkeypatch
):
    # the recommended row's seeds are already measured: the curve group adds
    # epsilon 1 and 3 and the DP baselines from that same run, and keeps the row
    utility, _ = scripts
    import argparse

    b = argparse.Namespace(work=tmp_path, pretrained_row="pretrained (720 steps)")
    b.sites = lambda run, dp: [tmp_path / run / "site.yaml"]
    (tmp_path / "runs" / "kept-run").mkdir(parents=True)
    row = "pretrained (720 steps) + fedavg DP eps=8 lr 0.003"
    kept = {"run": "kept-run", "eval_s": 1.0, "marker": "measured"}
    ran, based, saved = [], [], {}
    monkeypatch.setattr(utility, "pretrained", lambda b, seed: (tmp_path / "ck", {}))

    def federated(b, run, seed, eps, extra):
        ran.append((eps, extra))
        return tmp_path / "runs" / run, [], {"run": run, "eval_s": 1.0}

    def baselines(b, sites, run_dir, res, dp):
        based.append((run_dir.name, res.get("marker"), dp))
        return {"local DP": {"x": 1}, "pooled DP": {"x": 2}}

    monkeypatch.setattr(utility, "federated", federated)
    monkeypatch.setattr(utility, "baselines", baselines)
    args = argparse.Namespace(
        reference_epsilon=8.0,
        epsilons=[1.0, 3.0],
        pretrained_recipes=[("lr 0.003", {"learning-rate": 0.003})],
        saved_rows={row: {"0": kept}},
    )
    utility.pretrained_curve(b, 0, args, lambda r, res: saved.__setitem__(r, res))
    assert [eps for eps, _ in ran] == [1.0, 3.0]  # epsilon 8 not run again
    assert all(e["learning-rate"] == 0.003 for _, e in ran)
    assert all(e["initial-checkpoint"] == str(tmp_path / "ck") for _, e in ran)
    assert row not in saved  # the measured row is kept as it was
    assert based == [("kept-run", "measured", True)]
    assert saved["pretrained (720 steps) + local DP eps=8 lr 0.003"]["base"] == (
        "pretrained (720 steps)"
    )
    assert "pretrained (720 steps) + fedavg DP eps=3 lr 0.003" in saved

    # the run folder is gone (a fresh clone): epsilon 8 is run and saved
    ran.clear()
    (tmp_path / "runs" / "kept-run").rmdir()
    utility.pretrained_curve(b, 0, args, lambda r, res: saved.__setitem__(r, res))
    assert [eps for eps, _ in ran] == [1.0, 3.0, 8.0]
    assert saved[row]["run"] == "pretrained-dp-eps8"


def test_transfer_table_separates_a_site_model_s_own_hospital_from_the_others(
    scripts,
):
    # a site-alone model must not be credited with its home score everywhere:
    # that is what tells a consortium what the shared model adds
    _, table = scripts
    sites = ("hospital-thin", "hospital-standard", "hospital-thick")
    home, away = (
        {"dice-kidney": 0.9, "dice-tumour": 0.7},
        {
            "dice-kidney": 0.6,
            "dice-tumour": 0.3,
        },
    )
    matrix = {a: {b: home if a == b else away for b in sites} for a in sites}
    own = {s: matrix[s][s] for s in sites}
    out = {"rows": {"local DP": {"0": {"sites": own, "wall_s": 1, "steps": 1,
                                       "matrix": matrix}}}}  # fmt: skip
    text = table.table(out)
    assert "| local DP | 0.900 / 0.700 | 0.600 / 0.300 |" in text


def test_a_default_run_trains_each_row_once(scripts):
    # "epsilons" and "curve" both make the FedAvg DP rows: a default run with
    # both would train them twice and keep only the second
    utility, _ = scripts
    rows = utility._parser().parse_args([]).rows
    assert "curve" in rows and "epsilons" not in rows
    assert "pretrained-curve" in rows and "pretrained" in rows
