"""The phantom survival generator (issue 30): KiTS clinical data with a known
hazard, deterministic, and robust to a case it cannot read."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from sim.phantoms.kits_writer import write_site
from sim.phantoms.profiles import IMAGE_NAME, load_profile
from sim.phantoms.survival import (
    HAZARD,
    TRUTH_JSON,
    harrell_c,
    oracle_c_index,
    write_outcomes,
)
from sim.subgroups import plant_subgroups

N_CASES = 40
SCALE = 6.0  # coarse: 40 cases in about a second
_FIELDS = {
    "case_id",
    "age_at_nephrectomy",
    "gender",
    "vital_status",
    "vital_days_after_surgery",
    "radiographic_size",
    "tumor_isup_grade",
    "malignant",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-like CT site (the benchmark's large tumours) with subgroups.csv."""
    profile = load_profile("thin-slice-cm").model_copy(
        update={"tumour_median_diameter_mm": 55.0, "tumour_min_diameter_mm": 30.0}
    )
    root = tmp_path_factory.mktemp("survival") / "hospital-test"
    write_site(root, profile, N_CASES, seed=5, scale=SCALE)
    plant_subgroups(root, profile.name, seed=0)
    return root


def _outcomes(root: Path, seed: int) -> tuple[list[dict], dict]:
    kits = write_outcomes(root, seed)
    return json.loads(kits.read_text()), json.loads((root / TRUTH_JSON).read_text())


def test_kits_json_is_one_typed_entry_per_case(site: Path) -> None:
    records, truth = _outcomes(site, 0)
    cases = sorted(p.name for p in site.glob("case_*"))
    assert [r["case_id"] for r in records] == cases
    for r in records:
        assert set(r) == _FIELDS
        assert type(r["age_at_nephrectomy"]) is int
        assert r["gender"] in {"female", "male"}
        assert r["vital_status"] in {"dead", "censored"}
        days = r["vital_days_after_surgery"]
        assert type(days) is int and 0 < days <= HAZARD.follow_up_days
        assert type(r["malignant"]) is bool
        assert isinstance(r["radiographic_size"], float)
        if r["malignant"]:
            assert r["tumor_isup_grade"] in {1, 2, 3, 4}
            assert 1.0 <= r["radiographic_size"] <= 15.0
        else:
            assert r["tumor_isup_grade"] is None and r["radiographic_size"] == 0.0
        key = truth["cases"][r["case_id"]]
        assert key["event"] == (r["vital_status"] == "dead")
        assert key["time"] == days and key["grade"] == r["tumor_isup_grade"]
    assert any(r["malignant"] for r in records)
    events = np.mean([r["vital_status"] == "dead" for r in records])
    assert 0.15 <= events <= 0.75
    assert truth["version"] >= 1 and truth["parameters"]["weibull_shape"] > 0


def test_ages_and_sexes_come_from_subgroups(site: Path) -> None:
    records, _ = _outcomes(site, 0)
    with (site / "subgroups.csv").open() as fh:
        rows = {r["case"]: r for r in csv.DictReader(fh)}
    assert len(rows) == len(records)
    for r in records:
        assert r["age_at_nephrectomy"] == int(rows[r["case_id"]]["age"])
        assert r["gender"][0] == rows[r["case_id"]]["sex"]


def test_same_seed_same_bytes_other_seed_other_outcomes(site: Path) -> None:
    write_outcomes(site, 3)
    first = [(site / n).read_bytes() for n in ("kits.json", TRUTH_JSON)]
    write_outcomes(site, 3)
    assert [(site / n).read_bytes() for n in ("kits.json", TRUTH_JSON)] == first
    _, a = _outcomes(site, 3)
    _, b = _outcomes(site, 4)
    times = [(a["cases"][c]["time"], b["cases"][c]["time"]) for c in a["cases"]]
    assert sum(x != y for x, y in times) > len(times) // 2
    # Tumour volumes are read from the scans, whatever the seed...
    assert all(
        a["cases"][c]["tumour_ml"] == b["cases"][c]["tumour_ml"] for c in a["cases"]
    )
    # ...but grade carries its own jitter, so it is not intensity alone.
    grades = {c: {t["cases"][c]["grade"] for t in (a, b)} for c in a["cases"]}
    _, others = zip(*(_outcomes(site, s) for s in range(5, 9)), strict=True)
    for t in others:
        for c in grades:
            grades[c].add(t["cases"][c]["grade"])
    assert any(len(g) > 1 for g in grades.values())


def test_the_hazard_is_what_it_says(site: Path) -> None:
    # Pooled over outcome seeds, so the test checks the hazard, not one draw.
    oracle, large, small = [], [], []
    for seed in range(6):
        _, truth = _outcomes(site, seed)
        cases = truth["cases"]
        oracle.append(truth["oracle_c_harrell"])
        ids = sorted(cases)
        assert oracle[-1] == pytest.approx(oracle_c_index(truth, ids), abs=1e-6)
        half = oracle_c_index(truth, ids[::2])
        assert 0.0 <= half <= 1.0
        ml = np.array([cases[c]["tumour_ml"] for c in ids])
        cut = np.median(ml[ml > 0])
        for c, v in zip(ids, ml, strict=True):
            if v > 0:
                (large if v > cut else small).append(cases[c])
    assert np.mean(oracle) >= 0.65
    for group in (large, small):
        assert len(group) >= 6 * N_CASES // 4
    dead_large = np.mean([c["event"] for c in large])
    dead_small = np.mean([c["event"] for c in small])
    assert dead_large > dead_small + 0.1
    # Among deaths, the large tumours' come sooner.
    assert np.mean([c["time"] for c in large if c["event"]]) < np.mean(
        [c["time"] for c in small if c["event"]]
    )


def test_oracle_is_harrell_c_of_the_true_lp() -> None:
    truth = {
        "cases": {
            "a": {"lp": 2.0, "time": 10, "event": True},
            "b": {"lp": 1.0, "time": 20, "event": True},
            "c": {"lp": 0.0, "time": 30, "event": False},
            "d": {"lp": 3.0, "time": 40, "event": False},
        }
    }
    # Comparable pairs: (a,b) (a,c) (a,d) (b,c) (b,d); a<d and b<d discordant.
    assert oracle_c_index(truth, ["a", "b", "c", "d"]) == pytest.approx(3 / 5)
    assert oracle_c_index(truth, ["a", "b", "c"]) == 1.0
    assert harrell_c(np.array([2.0, 1.0]), np.array([10, 20]), np.array([1, 1])) == 1
    with pytest.raises(KeyError, match="case_x"):
        oracle_c_index(truth, ["a", "case_x"])


def test_a_corrupt_case_is_skipped_with_a_warning(
    site: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clean, _ = _outcomes(site, 0)
    root = tmp_path / site.name  # same folder name: same draws
    shutil.copytree(site, root)
    (root / "case_00002" / IMAGE_NAME).write_bytes(b"\x1f\x8b not a NIfTI")
    (root / "case_00005" / IMAGE_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="sim.phantoms.survival"):
        records, truth = _outcomes(root, 0)
    skipped = {"case_00002", "case_00005"}
    assert {r["case_id"] for r in records} == {r["case_id"] for r in clean} - skipped
    assert set(truth["cases"]) == {r["case_id"] for r in records}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("case_00002" in m for m in warned) == 1
    assert sum("case_00005" in m for m in warned) == 1
    # Each case has its own draws: the others' outcomes do not move.
    assert records == [r for r in clean if r["case_id"] not in skipped]


def test_an_mr_site_without_subgroups_gets_drawn_ages_and_own_grade_cuts(
    tmp_path: Path,
) -> None:
    root = tmp_path / "hospital-mr"
    profile = load_profile("mr-t2").model_copy(update={"tumour_prevalence": 1.0})
    write_site(root, profile, 16, seed=1, scale=SCALE)
    records, truth = _outcomes(root, 0)
    assert len(records) == 16 and truth["oracle_c_harrell"] is not None
    assert all(45 <= r["age_at_nephrectomy"] <= 80 for r in records)
    assert {r["gender"] for r in records} == {"female", "male"}
    # Quantile cuts on the site's own scores: every grade present.
    assert {r["tumor_isup_grade"] for r in records} == {1, 2, 3, 4}
