"""Subgroups (issue 29): read at the site, binned there, released only above
the floor, pooled at the coordinator with an interval that finds a planted gap
and not an absent one."""

import json
import random

import pytest
import torch

from client.data.errors import SiteDataError
from client.data.subgroups import group_indices, read_subgroups
from client.disclosure import denominator_counts, release
from client.tasks.segmentation.task import SegmentationTask
from common.contract import allowed_metric, max_metric_keys, value_problems
from common.task_models import build_plan_model
from server.reporting.fairness import fairness_lines, gaps
from sim.subgroups import plant_subgroups


def test_ages_are_binned_at_the_site_and_bad_values_named(tmp_path):
    (tmp_path / "subgroups.csv").write_text(
        "case,sex,age,scanner,contrast_phase\n"
        "case_00000,Female,34,SIEMENS Somatom Force,Nephrographic\n"
        "case_00001,m,71.5,GE,\n"
        "case_00002,,,,\n"
    )
    groups = read_subgroups(tmp_path)
    assert groups["case_00000"] == {
        "sex": "f",
        "age": "u40",
        "scanner": "siemens_somatom_force",
        "phase": "nephrographic",
    }
    assert groups["case_00001"] == {"sex": "m", "age": "70plus", "scanner": "ge"}
    assert groups["case_00002"] == {}
    # the raw age is nowhere in what the site keeps
    assert "34" not in json.dumps(groups) and "71.5" not in json.dumps(groups)
    (tmp_path / "subgroups.csv").write_text("case,age\ncase_00000,old\n")
    with pytest.raises(SiteDataError, match="row 2, column age"):
        read_subgroups(tmp_path)
    (tmp_path / "subgroups.csv").write_text("case,ethnicity\ncase_00000,x\n")
    with pytest.raises(SiteDataError, match="expected 'case' then"):
        read_subgroups(tmp_path)


def test_kits_clinical_json_is_read(tmp_path):
    (tmp_path / "kits.json").write_text(
        json.dumps(
            [
                {"case_id": "case_00000", "gender": "male", "age_at_nephrectomy": 62},
                {"case_id": "case_00001", "gender": "female", "age_at_nephrectomy": 45},
            ]
        )
    )
    groups = read_subgroups(tmp_path)
    assert groups["case_00000"] == {"sex": "m", "age": "60to69"}
    ids = ["case_00001", "case_00000", "case_00009"]
    assert group_indices(ids, groups) == {
        "age-40to59": [0],
        "sex-f": [0],
        "age-60to69": [1],
        "sex-m": [1],
    }


def test_a_group_below_the_floor_is_never_released():
    m = {
        "sg-age-70plus-cases-tumour": 6.0,
        "sg-age-70plus-dice-tumour": 0.5,
        "sg-age-70plus-dice2-tumour": 0.3,
        "sg-age-u40-cases-tumour": 2.0,
        "sg-age-u40-dice-tumour": 0.9,
        "sg-age-u40-dice2-tumour": 0.81,
    }
    out = release(m, denominator_counts(m, 20, {}), floor=5)
    assert set(out) == {
        "sg-age-70plus-cases-tumour",
        "sg-age-70plus-dice-tumour",
        "sg-age-70plus-dice2-tumour",
    }


def _pooled(groups: dict[str, list[float]]) -> dict[str, float]:
    """The coordinator's weighted means for one attribute's groups."""
    out = {}
    for name, dice in groups.items():
        n = len(dice)
        out[f"sg-age-{name}-cases-tumour"] = float(n)
        out[f"sg-age-{name}-dice-tumour"] = sum(dice) / n
        out[f"sg-age-{name}-dice2-tumour"] = sum(d * d for d in dice) / n
    return out


def test_the_table_finds_a_planted_gap_and_not_an_absent_one():
    """Over 200 synthetic federations: a 0.12 Dice gap between two groups of 60
    patients is found almost always; with no gap, the 95 % interval covers 0
    about 95 % of the time."""
    rng = random.Random(0)

    def draw(mean: float, n: int = 60) -> list[float]:
        return [min(1.0, max(0.0, rng.gauss(mean, 0.15))) for _ in range(n)]

    found_planted = found_absent = 0
    for _ in range(200):
        planted = gaps(_pooled({"60to69": draw(0.75), "70plus": draw(0.63)}))
        absent = gaps(_pooled({"60to69": draw(0.70), "70plus": draw(0.70)}))
        found_planted += planted[0].found
        found_absent += absent[0].found
    assert found_planted >= 190
    assert found_absent <= 20  # about 5 in 200 expected (one-sided of 2.5 %)
    line = fairness_lines({"weighted": _pooled({"a": draw(0.8), "b": draw(0.5)})})
    assert "tumour Dice by age" in line[0] and "a gap" in line[0]


def test_phantom_subgroups_plant_age_by_tumour_size_and_evaluate(tiny_site, tiny_plan):
    site = tiny_site
    plant_subgroups(site.data.root, "standard-nephro", seed=0)
    groups = read_subgroups(site.data.root)
    assert {v["scanner"] for v in groups.values()} == {"standard_nephro"}
    task = SegmentationTask()
    data = task.load_data(site, tiny_plan)
    assert data.groups and all(max(i) < data.n_val for i in data.groups.values())
    out = task.evaluate(
        build_plan_model(tiny_plan), data, tiny_plan, torch.device("cpu")
    )
    sg = {k: v for k, v in out.items() if k.startswith("sg-")}
    assert sg and all(allowed_metric(k, "evaluate", "segmentation") for k in sg)
    assert len(out) <= max_metric_keys("evaluate", "segmentation", 4)
    assert value_problems(out, 1000) == []
    # every group's counts add up to the validation cases it splits
    sexes = [
        v for k, v in sg.items() if k.startswith("sg-sex-") and "cases-kidney" in k
    ]
    assert sum(sexes) == out["cases-kidney"]


def test_a_broken_subgroups_file_never_stops_training(tiny_site, tiny_plan):
    """Groups are a report: a bad file is a site-check warning, and the site
    evaluates without groups rather than refusing."""
    from client.readiness import check_site

    (tiny_site.data.root / "subgroups.csv").write_text("case,age\ncase_00000,old\n")
    data = SegmentationTask().load_data(tiny_site, tiny_plan)
    assert data.groups == {}
    report = check_site(tiny_site.source)
    found = [f for f in report.findings if f.kind == "subgroups"]
    assert found and found[0].severity == "warning" and "row 2" in found[0].message
