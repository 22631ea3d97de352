"""End to end: a Flower simulation of two prognosis hospitals with DP (phantom
scans, outcomes from the survival generator), the same ClientApp, ServerApp,
ledger, checkpoints and report as the other tasks; then `kidneyfl predict`
on one of their scans (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from client.predict import predict
from common import wire
from server.export import TORCHSCRIPT_NAME
from server.reporting.metrics_log import read_metrics
from server.reporting.survival import survival_lines
from sim.runner import simulate

PLAN = {
    "task": "prognosis",
    "model": "prognosis-linear",
    "prognosis-crop-voxels": 16,
    "batch-size": 16,
    "local-epochs": 2,
    "learning-rate": 0.02,
    "num-server-rounds": 2,
    "min-sites": 2,
    "dp-target-epsilon": 8.0,
}


def _site(tmp: Path, name: str, profile: str, seed: int) -> Path:
    doc = {
        "name": name,
        "data": {"root": str(tmp / "data" / name), "validation_fraction": 0.5},
        "device": "cpu",
        "state_dir": str(tmp / "state" / name),
        "privacy": {
            "enabled": True,
            "max_epsilon": 10.0,
            "delta": 1e-3,
            "min_cases_for_aggregates": 3,
        },
        "phantom": {
            "task": "prognosis",
            "profile": profile,
            "cases": 48,
            "seed": seed,
            "scale": 6.0,
            "overrides": {"tumour_prevalence": 0.9, "tumour_min_diameter_mm": 30.0},
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
def test_prognosis_federation_with_dp_reports_c_index_and_predicts(tmp_path):
    sites = [
        _site(tmp_path, "site-a", "thin-slice-cm", 1),
        _site(tmp_path, "site-b", "standard-nephro", 2),
    ]
    run = simulate(
        sites,
        "prog",
        overrides=PLAN,
        out_dir=tmp_path / "runs",
        flwr_home=tmp_path / "flwr-home",
        stream=True,
    )
    entries = read_metrics(run)
    assert [e["round"] for e in entries] == [1, 2]
    for e in entries:
        assert not e["refused"] and not e["failed"] and not e["rejected"]
        for m in e["evaluate"].values():
            assert 0 <= m[wire.C_HARRELL] <= 1
            assert m[wire.CASES_OUTCOME] == m[wire.NUM_VAL_CASES]
            assert m[wire.CASES_EVENT] >= 3  # released: at least the floor
    eps = [e["epsilon"]["site-a"] for e in entries]
    assert 0 < eps[0] < eps[1] <= 8.0 * 1.01  # DP on, cumulative, within target
    pooled = entries[-1]["weighted"]
    assert pooled["cases-atrisk-low-0"] + pooled["cases-atrisk-high-0"] == sum(
        m[wire.CASES_OUTCOME] for m in entries[-1]["evaluate"].values()
    )  # life tables summed over sites
    lines = survival_lines(run, entries)
    assert lines and "C-index Harrell" in lines[0]
    assert 'id="prognosis"' in (run / "report.html").read_text()
    assert (run / "final" / TORCHSCRIPT_NAME).is_file()  # exported for any tool

    # the final model on one phantom scan, its reference labels beside it
    case = sorted((tmp_path / "data" / "site-a").glob("case_*"))[0]
    summary = predict(
        run / "final", case / "imaging.nii.gz", output=tmp_path / "out",
        task_options={"age": 70.0, "sex": "f"},
    )  # fmt: skip
    (res,) = summary["cases"].values()
    assert res["crop-labels"].startswith("reference labels")
    assert res["risk-score"] > 0
    saved = json.loads(Path(res["output"]).read_text())
    assert list(saved["survival"]) == ["180", "365", "730", "1095", "1460", "1825"]
