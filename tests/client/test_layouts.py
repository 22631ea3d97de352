"""Dataset layouts: each ends in the same case list and a label map.

Discovery never opens images, so the fixtures are empty files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.data.errors import SiteDataError
from client.data.label_map import remap_labels
from client.data.layouts import discover

IDENTITY_0_3 = {0: 0, 1: 1, 2: 2, 3: 3}


def touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def kits_case(root: Path, name: str, *files: str) -> Path:
    touch(*(root / name / f for f in files))
    return root / name


def write_json(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def nnunet_tree(root: Path, labels: dict, channels: dict | None = None) -> Path:
    ds = root / "Dataset220_KiTS2023"
    write_json(
        ds / "dataset.json",
        {
            "channel_names": channels or {"0": "CT"},
            "labels": labels,
            "numTraining": 2,
            "file_ending": ".nii.gz",
        },
    )
    touch(
        ds / "imagesTr" / "a_0000.nii.gz",
        ds / "imagesTr" / "b_0000.nii.gz",
        ds / "imagesTr" / "._a_0000.nii.gz",
        ds / "labelsTr" / "a.nii.gz",
        ds / "labelsTr" / "b.nii.gz",
        ds / "imagesTs" / "c_0000.nii.gz",
    )
    return ds


# --- KiTS ---------------------------------------------------------------------


def test_auto_picks_kits21_when_majority_segmentations_exist(tmp_path: Path) -> None:
    kits_case(tmp_path, "case_00000", "imaging.nii.gz", "aggregated_MAJ_seg.nii.gz")
    kits_case(tmp_path, "case_00001", "imaging.nii.gz", "aggregated_MAJ_seg.nii.gz")
    found = discover(tmp_path)
    assert found.layout == "kits21"
    assert [c.case_id for c in found.cases] == ["case_00000", "case_00001"]
    assert found.cases[0].label == tmp_path / "case_00000/aggregated_MAJ_seg.nii.gz"
    assert found.cases[0].image == tmp_path / "case_00000/imaging.nii.gz"
    assert found.label_map == IDENTITY_0_3
    assert found.splits == {}


def test_auto_picks_kits23_for_segmentation_files(tmp_path: Path) -> None:
    kits_case(tmp_path, "case_00000", "imaging.nii.gz", "segmentation.nii.gz")
    (tmp_path / "notes").mkdir()  # unrelated folders are not cases
    found = discover(tmp_path)
    assert found.layout == "kits23"
    assert [c.case_id for c in found.cases] == ["case_00000"]
    assert found.cases[0].label == tmp_path / "case_00000/segmentation.nii.gz"
    assert found.label_map == IDENTITY_0_3


def test_kits19_keeps_unlabelled_cases_and_has_no_cyst(tmp_path: Path) -> None:
    kits_case(tmp_path, "case_00000", "imaging.nii.gz", "segmentation.nii.gz")
    kits_case(tmp_path, "case_00210", "imaging.nii.gz")
    found = discover(tmp_path, layout="kits19")
    assert found.layout == "kits19"
    assert [(c.case_id, c.label) for c in found.cases] == [
        ("case_00000", tmp_path / "case_00000/segmentation.nii.gz"),
        ("case_00210", None),
    ]
    assert found.label_map == {0: 0, 1: 1, 2: 2}
    text = " ".join(found.notes)
    assert "no cyst" in text
    assert "I,P,L" in text


def test_kits_case_without_imaging_is_listed_not_dropped(tmp_path: Path) -> None:
    kits_case(tmp_path, "case_00000", "imaging.nii.gz", "segmentation.nii.gz")
    kits_case(tmp_path, "case_00001", "segmentation.nii.gz")
    found = discover(tmp_path)
    assert [c.case_id for c in found.cases] == ["case_00000", "case_00001"]
    assert not found.cases[1].image.exists()
    assert any("1 case folder(s) have no imaging" in n for n in found.notes)


def test_label_names_can_drop_kits_cysts(tmp_path: Path) -> None:
    kits_case(tmp_path, "case_00000", "imaging.nii.gz", "segmentation.nii.gz")
    found = discover(tmp_path, label_names={"cyst": "background"})
    assert found.label_map == {0: 0, 1: 1, 2: 2, 3: 0}


# --- Medical Segmentation Decathlon -------------------------------------------


def test_msd_uses_training_entries_and_ignores_macos_junk(tmp_path: Path) -> None:
    task = tmp_path / "Task99_Kidney"
    write_json(
        task / "dataset.json",
        {
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "Kidney", "2": "Tumour"},
            "training": [
                {
                    "image": "./imagesTr/k_001.nii.gz",
                    "label": "./labelsTr/k_001.nii.gz",
                },
                {
                    "image": "./imagesTr/k_002.nii.gz",
                    "label": "./labelsTr/k_002.nii.gz",
                },
                {
                    "image": "./imagesTr/._k_001.nii.gz",
                    "label": "./labelsTr/._k.nii.gz",
                },
            ],
            "test": ["./imagesTs/k_100.nii.gz", "./imagesTs/._k_100.nii.gz"],
        },
    )
    touch(task / "imagesTr" / "._k_003.nii.gz", task / "imagesTr" / "k_001.nii.gz")
    found = discover(tmp_path)
    assert found.layout == "msd"
    assert [(c.case_id, c.image, c.label) for c in found.cases] == [
        ("k_001", task / "imagesTr/k_001.nii.gz", task / "labelsTr/k_001.nii.gz"),
        ("k_002", task / "imagesTr/k_002.nii.gz", task / "labelsTr/k_002.nii.gz"),
        ("k_100", task / "imagesTs/k_100.nii.gz", None),
    ]
    assert found.label_map == {0: 0, 1: 1, 2: 2}


# --- nnU-Net v2 ---------------------------------------------------------------


def test_nnunet_name_to_value_labels(tmp_path: Path) -> None:
    ds = nnunet_tree(
        tmp_path, {"background": 0, "kidney": 1, "kidney_tumor": 3, "cyst": 2}
    )
    touch(ds / "labelsTr" / "d.nii.gz")  # its image is missing: listed, not dropped
    found = discover(tmp_path)
    assert found.layout == "nnunet"
    assert [(c.case_id, c.image, c.label) for c in found.cases] == [
        ("a", ds / "imagesTr/a_0000.nii.gz", ds / "labelsTr/a.nii.gz"),
        ("b", ds / "imagesTr/b_0000.nii.gz", ds / "labelsTr/b.nii.gz"),
        ("d", ds / "imagesTr/d_0000.nii.gz", ds / "labelsTr/d.nii.gz"),
        ("c", ds / "imagesTs/c_0000.nii.gz", None),
    ]
    assert found.label_map == {0: 0, 1: 1, 3: 2, 2: 3}


def test_nnunet_kits2023_region_labels_read_as_kits_values(tmp_path: Path) -> None:
    regions = {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    nnunet_tree(tmp_path, regions)
    found = discover(tmp_path, layout="nnunet")
    assert found.label_map == IDENTITY_0_3


def test_nnunet_region_label_covered_by_integers_is_ignored(tmp_path: Path) -> None:
    nnunet_tree(tmp_path, {"background": 0, "kidney": 1, "tumor": 2, "all": [1, 2]})
    assert discover(tmp_path).label_map == {0: 0, 1: 1, 2: 2}


def test_nnunet_region_label_with_uncovered_values_is_rejected(tmp_path: Path) -> None:
    nnunet_tree(tmp_path, {"background": 0, "kidney": 1, "lesion": [2, 3]})
    with pytest.raises(SiteDataError, match=r"'lesion' is a region .*\[2, 3\]"):
        discover(tmp_path)


def test_nnunet_multichannel_is_rejected(tmp_path: Path) -> None:
    nnunet_tree(tmp_path, {"background": 0, "kidney": 1}, {"0": "CT", "1": "PET"})
    with pytest.raises(SiteDataError) as err:
        discover(tmp_path)
    assert "dataset.json" in str(err.value)
    assert "one CT channel" in str(err.value)


def test_unmappable_label_name_says_how_to_fix(tmp_path: Path) -> None:
    ds = nnunet_tree(tmp_path, {"background": 0, "kidney": 1, "liver": 4})
    with pytest.raises(SiteDataError) as err:
        discover(tmp_path)
    msg = str(err.value)
    assert str(ds / "dataset.json") in msg
    assert "'liver'" in msg
    assert "data.label_names" in msg and "site YAML" in msg


def test_custom_label_names(tmp_path: Path) -> None:
    nnunet_tree(tmp_path, {"background": 0, "Liver": 1, "renal lesion": 2})
    found = discover(
        tmp_path, label_names={"liver": "background", "Renal Lesion": "Tumor"}
    )
    assert found.label_map == {0: 0, 1: 0, 2: 2}


@pytest.mark.parametrize(
    ("label_names", "match"),
    [
        ({"livr": "background"}, r"\['livr'\].*does not define"),
        ({"kidney": "organ"}, r"'organ'.*background, kidney, tumour, cyst"),
    ],
)
def test_bad_label_names_are_rejected(
    tmp_path: Path, label_names: dict[str, str], match: str
) -> None:
    nnunet_tree(tmp_path, {"background": 0, "kidney": 1})
    with pytest.raises(SiteDataError, match=match):
        discover(tmp_path, label_names=label_names)


# --- CSV manifest -------------------------------------------------------------


def test_manifest_relative_paths_splits_and_duplicate_ids(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "x.nii.gz"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "manifest.csv").write_text(
        "image,label,split\n"
        "img/x.nii.gz,lab/x.nii.gz,train\n"
        "\n"
        f"{elsewhere},,Test\n"
        "other/x.nii.gz,lab/x2.nii.gz,\n"
    )
    found = discover(tmp_path / "site")
    site = tmp_path / "site"
    assert found.layout == "manifest"
    assert [(c.case_id, c.image, c.label) for c in found.cases] == [
        ("x", site / "img/x.nii.gz", site / "lab/x.nii.gz"),
        ("x_2", elsewhere, None),
        ("x_3", site / "other/x.nii.gz", site / "lab/x2.nii.gz"),
    ]
    assert found.splits == {"x": "train", "x_2": "test"}
    assert found.label_map == IDENTITY_0_3


def test_manifest_path_given_explicitly(tmp_path: Path) -> None:
    csv = tmp_path / "lists" / "cases.csv"
    csv.parent.mkdir()
    csv.write_text("label,image\n,scan.nii\n")
    found = discover(tmp_path / "absent", manifest=csv)
    assert found.layout == "manifest"
    assert [(c.case_id, c.image) for c in found.cases] == [
        ("scan", tmp_path / "lists" / "scan.nii")
    ]


def test_manifest_bad_split_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text(
        "image,label,split\na.nii.gz,a_seg.nii.gz,train\nb.nii.gz,,holdout\n"
    )
    with pytest.raises(SiteDataError, match=r"row 3: unknown split 'holdout'"):
        discover(tmp_path)


def test_manifest_missing_column_names_file_and_header(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("image,split\na.nii.gz,train\n")
    with pytest.raises(SiteDataError) as err:
        discover(tmp_path)
    assert str(tmp_path / "manifest.csv") in str(err.value)
    assert "image,label[,split]" in str(err.value)


# --- detection and arguments --------------------------------------------------


def test_auto_on_empty_folder_lists_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError) as err:
        discover(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg
    for looked_for in ("manifest.csv", "dataset.json", "case_*/imaging.nii.gz"):
        assert looked_for in msg


def test_several_datasets_under_root_are_ambiguous(tmp_path: Path) -> None:
    write_json(tmp_path / "Dataset001_A" / "dataset.json", {"channel_names": {}})
    write_json(tmp_path / "Dataset002_B" / "dataset.json", {"channel_names": {}})
    with pytest.raises(SiteDataError, match="Dataset001_A, Dataset002_B"):
        discover(tmp_path)


def test_unknown_layout_and_misplaced_manifest_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="'kits24' is unknown"):
        discover(tmp_path, layout="kits24")
    with pytest.raises(SiteDataError, match="data.manifest is set"):
        discover(tmp_path, layout="kits23", manifest=tmp_path / "m.csv")


# --- remap_labels ---------------------------------------------------------------


def test_remap_labels_applies_the_map() -> None:
    labels = np.array([[0, 1], [2, 5]], dtype=np.int16)
    out = remap_labels(labels, {0: 0, 1: 1, 2: 3, 5: 2})
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 1], [3, 2]])
    floats = remap_labels(labels.astype(np.float32), {0: 0, 1: 1, 2: 3, 5: 2})
    np.testing.assert_array_equal(floats, out)


def test_remap_labels_names_unexpected_values() -> None:
    labels = np.array([0, 1, 4, 9, -1, 4])
    with pytest.raises(ValueError, match=r"\[-1, 4, 9\]"):
        remap_labels(labels, {0: 0, 1: 1, 2: 2})
    with pytest.raises(ValueError, match=r"\[1.5\] are not whole numbers"):
        remap_labels(np.array([0.0, 1.5]), {0: 0, 1: 1, 2: 2})


def test_manifest_patient_column_is_optional_and_read(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text(
        "patient,image,label\nP-7,a.nii.gz,a_seg.nii.gz\n,b.nii.gz,\n"
    )
    found = discover(tmp_path)
    assert [(c.case_id, c.patient, c.patient_id) for c in found.cases] == [
        ("a", "P-7", "P-7"),
        ("b", None, "b"),  # no id: the case is its own patient
    ]
    (tmp_path / "manifest.csv").write_text("image,label,mrn\na.nii.gz,,1\n")
    with pytest.raises(SiteDataError, match=r"\[,patient\]"):
        discover(tmp_path)
