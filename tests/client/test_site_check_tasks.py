"""``kidneyfl site check`` through the site's task, and one meaning per
``data.*`` key for both tasks (issue 18)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cli.main import main as kidneyfl
from client.data.errors import SiteDataError
from client.data.split import validation_count
from client.governance import approve
from client.readiness import check_site, format_check
from client.tasks.classification.data import load_site_slices
from client.tasks.registry import get_task, site_task
from client.tasks.segmentation.cases import load_site_cases
from common.config import load_site_config
from sim.phantoms.sites import write_site_phantom
from tests.fakes import cls_plan, write_cls_yaml, write_site_yaml

# The consortium's published bundle hash: every site here approved it, as a
# site does before its readiness check, so the checks below are about data.
PUBLISHED = "cd" * 32


def _cls_site(tmp_path: Path, cases: int = 12) -> Path:
    yaml_path = write_cls_yaml(tmp_path, "c", cases=cases)
    approve(yaml_path, sha256=PUBLISHED)
    write_site_phantom(load_site_config(yaml_path))
    return yaml_path


def _seg_site(tmp_path: Path, cases: int = 6) -> Path:
    yaml_path = write_site_yaml(tmp_path, "s", cases=cases)
    approve(yaml_path, sha256=PUBLISHED)
    return yaml_path


def _edit(yaml_path: Path, **data: object) -> Path:
    doc = yaml.safe_load(yaml_path.read_text())
    doc["data"].update(data)
    yaml_path.write_text(yaml.safe_dump(doc))
    return yaml_path


def _as_class_folders(tmp_path: Path, yaml_path: Path) -> Path:
    """The phantom's slices copied to ``<root>/<class>/<image>``; the YAML now
    names that folder with the class-folders layout and no phantom block."""
    site = load_site_config(yaml_path)
    folders = tmp_path / "folders"
    rows = (site.data.root / "manifest.csv").read_text().splitlines()[1:]
    for row in rows:
        image, label = row.split(",")[:2]
        (folders / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(site.data.root / image, folders / label / Path(image).name)
    doc = yaml.safe_load(yaml_path.read_text())
    doc.pop("phantom")
    doc["data"].update(root=str(folders), layout="class-folders")
    out = tmp_path / "folders.yaml"
    out.write_text(yaml.safe_dump(doc))
    return out


# --- the readiness check asks the task -----------------------------------------


def test_the_check_goes_through_the_sites_task(tmp_path):
    seg, cls = _seg_site(tmp_path), _cls_site(tmp_path)
    assert site_task(load_site_config(seg)).name == "segmentation"
    assert site_task(load_site_config(cls)).name == "classification"
    assert site_task(load_site_config(_as_class_folders(tmp_path, cls))).name == (
        "classification"
    )


@pytest.mark.parametrize("layout", ["manifest", "class-folders"])
def test_classification_check_counts_classes_per_split(tmp_path, layout, capsys):
    yaml_path = _cls_site(tmp_path)
    if layout == "class-folders":
        yaml_path = _as_class_folders(tmp_path, yaml_path)
    report = check_site(yaml_path)
    assert report.ok, format_check(report)
    assert report.task == "classification" and report.layout == layout
    assert report.cases_found == report.cases_usable == 12
    assert report.train_patients + report.validation_patients == 12
    by_split = report.class_cases_by_split
    assert sum(by_split["train"].values()) == report.train_patients
    assert sum(by_split["validation"].values()) == report.validation_patients
    for name, n in report.class_cases.items():
        assert by_split["train"].get(name, 0) + by_split["validation"].get(name, 0) == n
    assert kidneyfl(["site", "check", str(yaml_path)]) == 0
    out = capsys.readouterr().out
    assert "train cases per class:" in out and "validation cases per class:" in out
    assert out.strip().splitlines()[-1] == "READY: 12 cases will train, 0 left out"


@pytest.mark.parametrize("layout", ["manifest", "class-folders"])
def test_a_broken_slice_is_an_error_that_training_skips(tmp_path, layout, capsys):
    yaml_path = _cls_site(tmp_path)
    if layout == "class-folders":
        yaml_path = _as_class_folders(tmp_path, yaml_path)
    root = load_site_config(yaml_path).data.root
    broken = sorted(root.rglob("case_00003.nii.gz"))[0]
    broken.write_bytes(b"not a nifti")
    assert kidneyfl(["site", "check", str(yaml_path)]) == 1
    out = capsys.readouterr().out
    assert "ERROR unreadable (1): replace the file or list it under" in out
    assert f"{broken}: {broken}: cannot read the image" in out
    assert out.strip().splitlines()[-1].startswith("NOT READY: 1 of 12 cases")
    assert kidneyfl(["site", "check", str(yaml_path), "--allow-skips"]) == 0
    capsys.readouterr()
    data = get_task("classification").load_data(load_site_config(yaml_path), cls_plan())
    assert data.n_train + data.n_val == 11  # left out, as the check said


def test_an_unknown_class_is_named(tmp_path, capsys):
    yaml_path = _cls_site(tmp_path)
    manifest = tmp_path / "data" / "c" / "manifest.csv"
    rows = manifest.read_text().splitlines()
    rows[1] = rows[1].split(",")[0] + ",calculus"
    manifest.write_text("\n".join(rows) + "\n")
    kidneyfl(["site", "check", str(yaml_path)])
    out = capsys.readouterr().out
    assert "WARNING unknown-class (1)" in out and "class 'calculus'" in out
    with pytest.raises(SiteDataError, match=r"row 2: unknown class 'calculus'"):
        get_task("classification").load_data(load_site_config(yaml_path), cls_plan())
    folders = _as_class_folders(tmp_path, yaml_path)
    report = check_site(folders)
    assert [f.message for f in report.findings if f.kind == "unknown-class"] == [
        "class 'calculus' is not among the default plan's class-names (normal, "
        "cyst, tumour, stone); training refuses it unless the federation's plan "
        "lists it"
    ]
    with pytest.raises(SiteDataError, match=r"\['calculus'\] are not classes"):
        get_task("classification").load_data(load_site_config(folders), cls_plan())


# --- one meaning per data.* key -------------------------------------------------


def _load(task: str, yaml_path: Path):
    site = load_site_config(yaml_path)
    plan = cls_plan() if task == "classification" else None
    if task == "segmentation":
        return load_site_cases(site)
    return get_task(task).load_data(site, plan)


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_unknown_exclude_id_is_refused_by_both_tasks(tmp_path, task):
    site = _seg_site(tmp_path) if task == "segmentation" else _cls_site(tmp_path)
    _edit(site, exclude_cases=["case_0009"])
    with pytest.raises(SiteDataError) as err:
        _load(task, site)
    msg = str(err.value)
    assert "data.exclude_cases names ['case_0009']" in msg
    assert "fix the spelling or remove them" in msg
    report = check_site(site)
    assert not report.ok and [f.kind for f in report.blocking] == ["setup-data"]
    assert "data.exclude_cases names ['case_0009']" in report.blocking[0].message


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_exclusion_and_pinned_validation_mean_the_same(tmp_path, task):
    site = _seg_site(tmp_path) if task == "segmentation" else _cls_site(tmp_path)
    _edit(site, exclude_cases=["case_00000"], validation_cases=["case_00001"])
    report = check_site(site)
    assert report.cases_excluded == ["case_00000"] and report.ok
    assert report.validation_patients == 1  # pinned: the rest train
    if task == "segmentation":
        cases = _load(task, site)
        assert [c.case_id for c in cases.validation] == ["case_00001"]
        assert len(cases.train) == 4
    else:
        data = _load(task, site)
        assert (data.n_train, data.n_val) == (10, 1)
    _edit(site, validation_cases=["case_0001"])
    with pytest.raises(SiteDataError, match=r"cases \['case_0001'\] named in the"):
        _load(task, site)


def test_validation_fraction_rounds_the_same_for_both_tasks():
    table = {(1, 0.25): 0, (2, 0.25): 1, (8, 0.25): 2, (10, 0.25): 2}
    table |= {(4, 0.0): 0, (3, 0.9): 2, (12, 0.5): 6}
    assert {k: validation_count(*k) for k in table} == table


def test_segmentation_keys_are_refused_by_classification(tmp_path):
    site = _edit(_cls_site(tmp_path), label_names={"lesion": "tumour"})
    with pytest.raises(SiteDataError, match="data.label_names maps segmentation"):
        _load("classification", site)


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_the_yamls_lists_are_explicit_for_both_tasks(tmp_path, task):
    """A site that lists data.train_cases trains on those and nothing else: an
    unlisted patient is never trained on behind the site's back."""
    site = _seg_site(tmp_path) if task == "segmentation" else _cls_site(tmp_path)
    n = 6 if task == "segmentation" else 12
    listed = ["case_00000", "case_00001"]

    def sides() -> tuple[list[str], list[str]]:
        config = load_site_config(site)
        if task == "segmentation":
            cases = load_site_cases(config)
            train, val = cases.train, cases.validation
        else:
            train, val, _ = load_site_slices(config, cls_plan())
        return sorted(c.case_id for c in train), sorted(c.case_id for c in val)

    _edit(site, train_cases=listed)  # only training listed: the rest validate
    train, val = sides()
    assert train == listed and len(val) == n - 2 and not set(val) & set(listed)
    _edit(site, train_cases=listed[:1], validation_cases=listed[1:])  # both: exact
    assert sides() == (listed[:1], listed[1:])
    doc = yaml.safe_load(site.read_text())
    doc["data"].pop("train_cases")
    site.write_text(yaml.safe_dump(doc))  # only validation listed: the rest train
    train, val = sides()
    assert val == listed[1:] and len(train) == n - 1
