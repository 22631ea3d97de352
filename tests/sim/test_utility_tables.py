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
