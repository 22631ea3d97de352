"""benchmarks/prognosis.py's table: per seed the patient-weighted mean over
sites, then spread over seeds; each site alone is its own model on its own
patients (a table that mixed them would misstate what federation buys)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))  # run as a file, as the docs say
    try:
        yield importlib.import_module("prognosis")
    finally:
        sys.path.remove(str(BENCH))


def _site(c: float, n: int) -> dict:
    return {
        "c-harrell": c,
        "c-uno": c,
        "td-auc-1095": c,
        "ibs": 0.2,
        "cases-outcome": n,
    }


def test_rows_are_weighted_over_sites_and_spread_over_seeds(bench):
    sites = bench.SITES
    runs = {"FedAvg, no DP": {}}
    for seed, shift in (("0", 0.0), ("1", 0.1)):
        fed = {
            s: _site(0.6 + shift, n) for s, n in zip(sites, (10, 30, 60), strict=True)
        }
        fed[sites[0]]["c-harrell"] = 0.9 + shift  # the small site scores higher
        local = {f"local-{s}": {t: _site(0.1, 40) for t in sites} for s in sites}
        for s in sites:
            local[f"local-{s}"][s] = _site(0.5 + shift, 40)  # its own patients
        oracle = {s: {"oracle": 0.8, "patients": 40} for s in sites}
        runs["FedAvg, no DP"][seed] = {
            "models": {"federated": fed, **local},
            "oracle": oracle,
        }
    rows = {r["row"]: r for r in bench.summarise(runs)}
    fed = rows["FedAvg, no DP"]["c-harrell"]
    want = [(0.9 * 10 + 0.6 * 90) / 100, (1.0 * 10 + 0.7 * 90) / 100]
    assert fed[0] == pytest.approx(sum(want) / 2) and fed[2] == 2
    assert fed[1] == pytest.approx(abs(want[1] - want[0]) / 2)
    alone = rows["each site alone (no DP)"]["c-harrell"]
    assert alone[0] == pytest.approx(0.55) and alone[2] == 2
    assert rows["oracle (true hazard)"]["c-harrell"][0] == pytest.approx(0.8)
    assert "0.680 ± 0.050 (2)" in bench.render(list(rows.values()))
