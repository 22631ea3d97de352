"""Outcomes for prognosis (issue 30): read at the site from outcomes.csv, the
manifest's time/event columns or KiTS' kits.json, in that order; every invalid
value refused with the file, the row and the fix; the readiness check says
what it found."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.data.check_report import DataCheck
from client.data.errors import SiteDataError
from client.data.layouts import discover
from client.data.manifest import read_manifest_rows
from client.data.outcome_check import check_outcomes
from client.data.outcomes import (
    COVARIATES,
    EVENTS,
    OUTCOME_FILES,
    Outcome,
    outcome_source,
    read_outcomes,
)
from common.config import SiteConfig


def _site(root: Path, layout: str = "auto", manifest: Path | None = None):
    data = {"root": str(root), "layout": layout}
    if manifest is not None:
        data["manifest"] = str(manifest)
    return SiteConfig.model_validate(
        {
            "name": "s",
            "data": data,
            "state_dir": str(root / "state"),
            "privacy": {"enabled": False},
        }
    )


def _kits(root: Path, entries: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "kits.json").write_text(json.dumps(entries))
    return root / "kits.json"


def _entry(i: int, status: str | None = "censored", days: object = 400, **kw):
    rec = {"case_id": f"case_{i:05d}", "age_at_nephrectomy": 63, "gender": "male"}
    rec |= {"radiographic_size": 4.2, "tumor_histologic_subtype": "clear_cell_rcc"}
    if status is not None:
        rec |= {"vital_status": status, "vital_days_after_surgery": days}
    return rec | kw


def _refused(site: SiteConfig, *parts: str) -> str:
    with pytest.raises(SiteDataError) as err:
        read_outcomes(site)
    for part in parts:
        assert part in str(err.value), (part, str(err.value))
    return str(err.value)


# --- the three sources and their precedence ---------------------------------------


def test_exports() -> None:
    assert OUTCOME_FILES == ("outcomes.csv", "kits.json")
    assert COVARIATES == ("age", "sex", "size")


def test_outcomes_csv_any_column_order_covariates_binned(tmp_path: Path) -> None:
    (tmp_path / "outcomes.csv").write_text(
        "\ufeffSize_cm,event,case,time,sex,age\n"
        "3.5,1,case_00000,120,Female,34\n"
        ",0,case_00001,2000.5,,\n"
        ",,case_00002,,m,70\n"  # neither time nor event: no outcome
        "\n"
    )
    site = _site(tmp_path)
    assert outcome_source(site) == tmp_path / "outcomes.csv"
    got = read_outcomes(site)
    assert got == {
        "case_00000": Outcome(120.0, 1, "u40", "f", 3.5),
        "case_00001": Outcome(2000.5, 0, None, None, None),
    }
    assert "34" not in repr(got)  # the raw age is not kept


def test_only_required_columns(tmp_path: Path) -> None:
    (tmp_path / "outcomes.csv").write_text("case,time,event\na,1,dead\nb,3,ALIVE\n")
    got = read_outcomes(_site(tmp_path))
    assert got == {
        "a": Outcome(1.0, 1, None, None, None),
        "b": Outcome(3.0, 0, *[None] * 3),
    }


def test_kits_json_vital_status_and_clinical_keys(tmp_path: Path) -> None:
    _kits(
        tmp_path,
        [
            _entry(0, "dead", 35),
            _entry(1, "censored", 1200, gender="female", age_at_nephrectomy=45),
            _entry(2, None),  # no vital status: a case without an outcome
            _entry(3, "Deceased", 7.5, radiographic_size=None),
            _entry(4, "alive", 10, age_at_nephrectomy=None, gender=""),
        ],
    )
    site = _site(tmp_path, "kits23")
    assert outcome_source(site) == tmp_path / "kits.json"
    assert read_outcomes(site) == {
        "case_00000": Outcome(35.0, 1, "60to69", "m", 4.2),
        "case_00001": Outcome(1200.0, 0, "40to59", "f", 4.2),
        "case_00003": Outcome(7.5, 1, "60to69", "m", None),
        "case_00004": Outcome(10.0, 0, None, None, 4.2),
    }


def _manifest(root: Path, header: str, rows: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")
    return root / "manifest.csv"


def test_manifest_time_and_event_columns(tmp_path: Path) -> None:
    _manifest(
        tmp_path,
        "image,label,time,event,patient,age,sex,size_cm",
        [
            "a.nii.gz,a_seg.nii.gz,100,1,p1,55,F,2",
            "b.nii.gz,,,,,,,",  # no outcome
            "x/a.nii.gz,,100,1,p1,,,",  # a second scan of p1: same outcome, id a_2
        ],
    )
    site = _site(tmp_path)
    assert outcome_source(site) == tmp_path / "manifest.csv"
    assert read_outcomes(site) == {
        "a": Outcome(100.0, 1, "40to59", "f", 2.0),
        "a_2": Outcome(100.0, 1, None, None, None),
    }
    # the ids are those the layout gives the cases
    assert {c.case_id for c in discover(tmp_path).cases} >= {"a", "a_2"}


def test_manifest_path_from_the_site_yaml(tmp_path: Path) -> None:
    m = _manifest(tmp_path / "lists", "image,label,time,event", ["s.nii,,5,0"])
    site = _site(tmp_path / "absent", "manifest", manifest=m)
    assert outcome_source(site) == m
    assert read_outcomes(site) == {"s": Outcome(5.0, 0, None, None, None)}


def test_precedence_csv_then_manifest_then_kits(tmp_path: Path) -> None:
    _kits(tmp_path, [_entry(0, "dead", 3)])
    _manifest(tmp_path, "image,label", ["case_00000.nii.gz,"])
    site = _site(tmp_path)
    # a manifest without outcome columns is no source: kits.json is
    assert outcome_source(site) == tmp_path / "kits.json"
    _manifest(tmp_path, "image,label,time,event", ["case_00000.nii.gz,,9,0"])
    assert outcome_source(site) == tmp_path / "manifest.csv"
    assert read_outcomes(site)["case_00000"].time == 9.0
    (tmp_path / "outcomes.csv").write_text("case,time,event\ncase_00000,11,1\n")
    assert outcome_source(site) == tmp_path / "outcomes.csv"
    assert read_outcomes(site)["case_00000"] == Outcome(11.0, 1, None, None, None)
    # a KiTS layout does not read a manifest, whatever is in the folder
    (tmp_path / "outcomes.csv").unlink()
    assert outcome_source(_site(tmp_path, "kits23")) == tmp_path / "kits.json"


def test_no_source(tmp_path: Path) -> None:
    site = _site(tmp_path)
    assert outcome_source(site) is None
    assert read_outcomes(site) == {}
    report = DataCheck()
    check_outcomes(site, ["a"], ["b"], 5, report)
    assert report.findings == []
    assert report.notes == [
        "no outcomes found (outcomes.csv, manifest time/event, kits.json): "
        "prognosis cannot run at this site"
    ]


# --- every invalid value is named with its file, row and fix ---------------------

CSV_ERRORS = [
    ("case,time\na,1\n", "row 1", "header 'case,time'"),
    ("case,time,event,stage\na,1,1,2\n", "row 1", "'case,time,event[,age]"),
    ("case,time,event,time\n", "row 1", "header"),
    ("", "row 1", "(empty)"),
    ("case,time,event\na,1\n", "row 2", "2 fields but the header has 3"),
    ("case,time,event\na,abc,1\n", "row 2, column time", "'abc' is not a number"),
    ("case,time,event\na,1_000,1\n", "row 2, column time", "is not a number"),
    ("case,time,event\na,-3,1\n", "row 2, column time", "-3 is negative"),
    ("case,time,event\na,0,1\n", "row 2, column time", "time 0: a patient followed"),
    ("case,time,event\na,0.0,0\n", "row 2, column time", "for an event on the day"),
    ("case,time,event\na,nan,1\n", "row 2, column time", "'nan' is not finite"),
    ("case,time,event\na,inf,1\n", "row 2, column time", "is not finite"),
    ("case,time,event\na,1e400,1\n", "row 2, column time", "is not finite"),
    ("case,time,event\na,20190312,1\n", "row 2, column time", "100 years"),
    ("case,time,event\na,,1\n", "row 2, column time", "empty while event is not"),
    ("case,time,event\na,5,\n", "row 2, column event", "empty while time is not"),
    ("case,time,event\na,5,2\n", "row 2, column event", "'2' is not 1 or 0"),
    ("case,time,event\na,5,true\n", "row 2, column event", "is not 1 or 0"),
    ("case,time,event\na,5,1.0\n", "row 2, column event", "write 1 if the event"),
    ("case,time,event\na,1,1\nb,2,0\na,3,0\n", "row 4", "case a is also in row 2"),
    ("case,time,event\n,1,1\n", "row 2", "no case id"),
    ("case,time,event,sex\na,1,1,x\n", "row 2, column sex", "is not f, m"),
    ("case,time,event,age\na,1,1,old\n", "row 2, column age", "write the age"),
    ("case,time,event,age\na,1,1,130\n", "row 2, column age", "not in 0..120"),
    ("case,time,event,size_cm\na,1,1,-2\n", "row 2, column size_cm", "not in 0..50"),
    ("case,time,event,size_cm\na,1,1,51\n", "row 2, column size_cm", "51 cm"),
    ("case,time,event,size_cm\na,1,1,big\n", "row 2, column size_cm", "number"),
]


@pytest.mark.parametrize(("text", "where", "what"), CSV_ERRORS)
def test_csv_errors_name_file_row_and_fix(tmp_path, text, where, what) -> None:
    (tmp_path / "outcomes.csv").write_text(text)
    message = _refused(_site(tmp_path), f"{tmp_path / 'outcomes.csv'}: {where}", what)
    assert "; " in message  # then the fix


def test_unreadable_csv(tmp_path: Path) -> None:
    (tmp_path / "outcomes.csv").write_bytes(b"case,time,event\n\xff\xfe,1,1\n")
    _refused(_site(tmp_path), "outcomes.csv: cannot read", "save it as UTF-8 CSV")


def test_all_problems_are_counted_first_one_named(tmp_path: Path) -> None:
    (tmp_path / "outcomes.csv").write_text("case,time,event\na,-1,1\nb,2,7\nc,3,1\n")
    _refused(_site(tmp_path), "row 2, column time", "(1 more problem(s)")


KITS_ERRORS = [
    ("not json", "cannot read the KiTS clinical data"),
    ('{"case_id": "case_00000"}', "expected a list of cases"),
    ('[{"vital_status": "dead"}]', "entry 0: no case_id"),
    ('[{"case_id": "a"}, {"case_id": "a"}]', "entry 1: case a is also entry 0"),
]


@pytest.mark.parametrize(("text", "what"), KITS_ERRORS)
def test_unreadable_kits_json(tmp_path, text, what) -> None:
    (tmp_path / "kits.json").write_text(text)
    _refused(_site(tmp_path, "kits21"), str(tmp_path / "kits.json"), what)


@pytest.mark.parametrize(
    ("change", "where", "what"),
    [
        ({"vital_status": "unknown"}, "key vital_status", "'unknown' is not 1 or 0"),
        ({"vital_status": True}, "key vital_status", "is not 1 or 0"),
        ({"vital_days_after_surgery": -5}, "key vital_days_after_surgery", "negative"),
        ({"vital_days_after_surgery": 0}, "key vital_days_after_surgery", "time 0"),
        ({"vital_days_after_surgery": "12d"}, "key vital_days_after_surgery", "number"),
        ({"vital_days_after_surgery": None}, "key vital_days_after_surgery", "empty"),
        ({"gender": "unknown"}, "key gender", "is not f, m"),
        ({"age_at_nephrectomy": -1}, "key age_at_nephrectomy", "not in 0..120"),
        ({"radiographic_size": 80}, "key radiographic_size", "not in 0..50"),
        ({"radiographic_size": -0.5}, "key radiographic_size", "-0.5 cm"),
    ],
)
def test_kits_entry_errors_name_the_entry(tmp_path, change, where, what) -> None:
    _kits(tmp_path, [_entry(0), _entry(1) | change])
    _refused(
        _site(tmp_path, "kits23"),
        f"{tmp_path / 'kits.json'}: entry 1 (case_00001), {where}: ",
        what,
    )


def test_manifest_outcome_errors(tmp_path: Path) -> None:
    header = "image,label,time,event,patient"
    _manifest(tmp_path, header, ["a.nii,,5,1,", "b.nii,,5,x,"])
    _refused(_site(tmp_path), "manifest.csv: row 3, column event", "'x' is not")
    _manifest(tmp_path, header, ["a.nii,,5,1,p", "b.nii,,6,1,p"])
    _refused(_site(tmp_path), "row 3: patient p has another time or event in row 2")
    _manifest(tmp_path, "image,label,time", ["a.nii,,5"])
    _refused(_site(tmp_path), "row 1: the manifest has a time column but no event")
    _manifest(tmp_path, "image,label,time,event,split", ["a.nii,,5,1,later"])
    _refused(_site(tmp_path), "manifest.csv: row 2: unknown split", "fix the manifest")


# --- the property: a bad time or event is never accepted silently ----------------


def _finite_positive(text: str) -> bool:
    try:
        return 0 < float(text) < math.inf
    except ValueError:
        return False


_CELL = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
    max_size=8,
)
_BAD_TIME = st.one_of(
    st.floats(max_value=0.0).map(repr),
    st.sampled_from(["nan", "-inf", "Infinity", "abc", "1,5", "3 days", "0x10"]),
    _CELL,
).filter(lambda t: t.strip() != "" and not _finite_positive(t))
_BAD_EVENT = st.one_of(
    st.integers().map(str),
    st.sampled_from(["true", "false", "yes", "no", "1.0", "2", "-1", "died"]),
    _CELL,
).filter(lambda e: e.strip() != "" and e.strip().lower() not in EVENTS)
_ANY_TIME = st.one_of(st.floats(0.5, 5000).map(repr), _BAD_TIME, st.just(""))
_ANY_EVENT = st.one_of(st.sampled_from(sorted(EVENTS)), _BAD_EVENT, st.just(""))


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.one_of(st.tuples(_BAD_TIME, _ANY_EVENT), st.tuples(_ANY_TIME, _BAD_EVENT)))
def test_a_bad_time_or_event_is_refused_never_accepted(tmp_path, cells) -> None:
    time, event = cells
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerows([["case", "time", "event"], ["ok", "10", "1"], ["c", time, event]])
    path = tmp_path / "outcomes.csv"
    path.write_text(buf.getvalue(), encoding="utf-8")
    site = _site(tmp_path)
    with pytest.raises(SiteDataError, match="outcomes.csv") as err:
        read_outcomes(site)
    assert str(path) in str(err.value)
    report = DataCheck()
    check_outcomes(site, ["ok", "c"], [], 1, report)
    errors = [f for f in report.findings if f.severity == "error"]
    assert errors and all(f.file == str(path) for f in errors)
    assert errors[0].message.startswith("row 3, column ")


# --- what the readiness check says ---------------------------------------------


def _check(site: SiteConfig, train, val, floor) -> tuple[DataCheck, dict]:
    report = DataCheck()
    check_outcomes(site, train, val, floor, report)
    return report, {f.kind: f for f in report.findings}


def test_check_counts_per_split_and_warns_under_the_floor(tmp_path: Path) -> None:
    entries = [_entry(i, "dead" if i % 2 else "censored", 100 + i) for i in range(8)]
    _kits(tmp_path, entries + [_entry(8, None)])
    site = _site(tmp_path, "kits23")
    train = [f"case_{i:05d}" for i in (0, 1, 2, 3, 4, 5)]
    val = ["case_00006", "case_00007", "case_00008"]
    report, found = _check(site, train, val, 3)
    assert report.notes == [
        f"outcomes from kits.json {tmp_path / 'kits.json'}: training 6 patient(s) "
        "with an outcome, 3 event(s); validation 2 patient(s), 1 event(s); "
        "4 of 8 censored (50%)"
    ]
    assert set(found) == {"outcomes-missing", "outcomes-few-validation"}
    assert all(f.severity == "warning" for f in found.values())
    missing = found["outcomes-missing"]
    assert "1 usable case(s) have no outcome" in missing.message
    assert "case_00008" in missing.message and "kits.json" in missing.fix
    few = found["outcomes-few-validation"].message
    assert "2 patient(s) with an outcome and 1 event(s)" in few
    assert (
        "prognosis metrics will be withheld: C-index and the others are released "
        "only over at least 3 patients and 3 events"
    ) in few
    # a floor of 1 is met by validation; training's 3 events meet 3 and not 4
    assert not _check(site, train, val, 1)[1].keys() - {"outcomes-missing"}
    _, found = _check(site, train, val, 4)
    assert "outcomes-few-training-events" in found
    assert (
        "training has 3 event(s) among 6"
        in found["outcomes-few-training-events"].message
    )


def test_check_lists_a_few_missing_cases_and_outcomes_for_no_case(tmp_path) -> None:
    (tmp_path / "outcomes.csv").write_text("case,time,event\nt0,5,1\nzz,4,1\n")
    train = ["t0"] + [f"m{i}" for i in range(9)]
    report, found = _check(_site(tmp_path), train, [], 1)
    assert "1 outcome(s) for no usable case" in report.notes[0]
    missing = found["outcomes-missing"].message
    assert "9 usable case(s)" in missing and "m0, m1, m2, m3, m4 and 4 more" in missing
    assert "m5" not in missing


def test_check_warns_when_almost_all_are_censored(tmp_path: Path) -> None:
    rows = [f"c{i},{100 + i},{int(i == 0)}" for i in range(11)]
    (tmp_path / "outcomes.csv").write_text("case,time,event\n" + "\n".join(rows))
    ids = [f"c{i}" for i in range(11)]
    report, found = _check(_site(tmp_path), ids[:8], ids[8:], 1)
    assert "10 of 11 censored (91%)" in report.notes[0]
    assert "91% of the patients with an outcome are censored" in (
        found["outcomes-mostly-censored"].message
    )
    rows[1] = "c1,101,1"  # 9 of 11 censored: 82 %, no warning
    (tmp_path / "outcomes.csv").write_text("case,time,event\n" + "\n".join(rows))
    report, found = _check(_site(tmp_path), ids[:8], ids[8:], 1)
    assert "(82%)" in report.notes[0] and "outcomes-mostly-censored" not in found


def test_check_reports_every_invalid_row_as_an_error(tmp_path: Path) -> None:
    (tmp_path / "outcomes.csv").write_text(
        "case,time,event,sex\na,-1,1,f\nb,2,maybe,m\nc,3,1,?\nd,4,0,f\n"
    )
    path = str(tmp_path / "outcomes.csv")
    report, _ = _check(_site(tmp_path), ["a", "b", "c", "d"], [], 1)
    errors = [(f.kind, f.message) for f in report.findings if f.severity == "error"]
    assert [k for k, _ in errors] == ["outcomes-time", "outcomes-event", "outcomes-sex"]
    assert errors[0][1] == "row 2, column time: time -1 is negative"
    assert all(f.file == path for f in report.findings)
    assert "3 problem(s)" in report.notes[0]
    # no counts or floor warnings from a file that is being fixed
    assert len(report.findings) == 3


# --- the manifest, with and without the new columns -----------------------------


def test_old_manifests_read_as_before(tmp_path: Path) -> None:
    _manifest(tmp_path, "image,label,split,patient", ["a.nii,a_seg.nii,train,p"])
    (row,) = read_manifest_rows(tmp_path / "manifest.csv")
    assert (row.row, row.label, row.split, row.patient) == (
        2,
        "a_seg.nii",
        "train",
        "p",
    )
    assert (row.time, row.event, row.age, row.sex, row.size_cm) == ("",) * 5
    assert outcome_source(_site(tmp_path)) is None


def test_manifest_carries_outcome_columns_as_strings(tmp_path: Path) -> None:
    _manifest(
        tmp_path,
        "size_cm,image,event,label,time,sex,age",
        [" 4.1 ,a.nii, dead ,,30,F,77", ",b.nii,,,,,"],
    )
    a, b = read_manifest_rows(tmp_path / "manifest.csv")
    assert (a.time, a.event, a.age, a.sex, a.size_cm) == (
        "30",
        "dead",
        "77",
        "F",
        "4.1",
    )
    assert (b.time, b.event, b.age, b.sex, b.size_cm) == ("",) * 5
    assert [c.case_id for c in discover(tmp_path).cases] == ["a", "b"]
    # other columns are still refused, and the header says what is accepted
    _manifest(tmp_path, "image,label,survival", ["a.nii,,3"])
    with pytest.raises(SiteDataError, match=r"\[,time,event\]\[,age,sex,size_cm\]"):
        read_manifest_rows(tmp_path / "manifest.csv")
