"""The GPU plan: its preset validates, and benchmarks/gpu_plan.py's smoke run
prints figures that agree with each other (docs/gpu-plan.md is written from
them: a ratio or a round time that did not follow from the measured steps
would misprice a consortium's run)."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
import tomllib
from pathlib import Path

import pytest

from common.config import Plan

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
PRESET = ROOT / "sites" / "plan-gpu-kits.toml"


@pytest.fixture(scope="module")
def gpu_plan():
    sys.path.insert(0, str(BENCH))  # run as a file, as the docs say
    try:
        yield importlib.import_module("gpu_plan")
    finally:
        sys.path.remove(str(BENCH))


def _defaults() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_preset_validates_as_a_plan_at_real_scale() -> None:
    with open(PRESET, "rb") as fh:
        preset = tomllib.load(fh)
    plan = Plan.model_validate({**_defaults(), **preset})
    assert plan.task == "segmentation"
    assert plan.model not in ("unet-tiny", "unet-tiny-affine")
    assert all(1.5 <= s <= 2.0 for s in plan.spacing_mm)
    assert all(96 <= p <= 128 and p % 16 == 0 for p in plan.patch_size)
    # the round must not time out before a site at this scale can answer
    assert plan.round_timeout > Plan().round_timeout


def test_overrides_are_validated_and_a_typo_names_the_key(gpu_plan) -> None:
    from common.config import ConfigError

    sets = gpu_plan.parse_sets(["batch-size=12", "spacing-mm=2,2,2"])
    plan = gpu_plan.load_preset(PRESET, sets)
    assert plan.batch_size == 12 and plan.spacing_mm == (2.0, 2.0, 2.0)
    with pytest.raises(ConfigError, match="batch-sise"):
        gpu_plan.load_preset(PRESET, {"batch-sise": 12})


def test_batch_bound_is_the_binomial_tail(gpu_plan) -> None:
    # 10 patients at batch 5: each joins a step with probability 1/2.
    # P(batch > 8) = 11/1024 > 1 %, P(batch > 9) = 1/1024: the bound is 9
    assert gpu_plan.batch_bound(10, 5, total_steps=1) == 9
    # over 20 steps even a batch of 10 (all) is the only safe bound
    assert gpu_plan.batch_bound(10, 5, total_steps=20) == 10
    assert gpu_plan.batch_bound(10, 10, total_steps=100) == 10  # rate 1


def test_smoke_run_figures_are_present_finite_and_consistent(
    gpu_plan, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gpu-plan.json"
    argv = ["--scale-down", "--steps", "2", "--warmup", "1", "--noise-multiplier"]
    argv += ["1.0", "--patients-per-site", "6", "--sites", "3"]
    argv += ["--gpu-hourly-usd", "2.5", "--json", str(out)]
    assert gpu_plan.main(argv) == 0
    printed = capsys.readouterr().out
    row = json.loads(out.read_text())

    label = gpu_plan.SMOKE_LABEL if row["device"] == "cpu" else gpu_plan.SCALED_LABEL
    assert row["scaled_down"] and row["label"] == label
    assert printed.startswith(label)
    assert row["patch_size"] == [32, 32, 32] and row["batch_size"] == 2
    numbers = (
        "plain_step_s", "plain_step_min_s", "plain_step_max_s", "dp_step_s",
        "dp_step_min_s", "dp_step_max_s", "dp_plain_ratio", "patients_per_s",
        "plain_patients_per_s", "round_train_s", "round_s", "run_s", "cost_usd",
        "gpu_hours", "noise_multiplier", "sample_rate",
    )  # fmt: skip
    for key in numbers:
        assert math.isfinite(row[key]) and row[key] > 0, key
    for kind in ("plain", "dp"):
        lo, mid, hi = (row[f"{kind}_step{s}_s"] for s in ("_min", "", "_max"))
        assert lo <= mid <= hi
    if row["device"] == "cpu":
        assert row["dp_peak_mib"] is None and "n/a (CPU)" in printed
    else:
        assert row["dp_peak_mib"] > 0

    assert row["dp_plain_ratio"] == pytest.approx(
        row["dp_step_s"] / row["plain_step_s"]
    )
    assert row["patients_per_s"] == pytest.approx(2 / row["dp_step_s"])
    train = 6 * row["local_epochs"] / row["patients_per_s"]
    assert row["round_s"] == pytest.approx(train + gpu_plan.ROUND_FLOOR_S)
    assert row["run_s"] == pytest.approx(row["rounds"] * row["round_s"])
    assert row["cost_usd"] == pytest.approx(3 * row["run_s"] / 3600 * 2.5)

    # the printed round follows from the printed throughput
    shown = float(re.search(r"throughput DP\s+([\d.e+-]+) patients/s", printed)[1])
    round_shown = float(re.search(r"round\s+([\d.]+) s =", printed)[1])
    expect = 6 * row["local_epochs"] / shown + gpu_plan.ROUND_FLOOR_S
    assert round_shown == pytest.approx(expect, rel=2e-3, abs=0.1)
