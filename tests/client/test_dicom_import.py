"""``kidneyfl site import-dicom``: synthetic PACS exports (pydicom, highdicom SEG)
become a KiTS-style site whose geometry, HU, labels and de-identification hold,
that resumes, and that ``kidneyfl site check`` accepts."""

from __future__ import annotations

import csv
import gzip
import logging
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RTStructureSetStorage,
    generate_uid,
)

from cli.main import main as kidneyfl
from client.data.dicom_import import PSEUDONYM_MAP, format_summary, import_dicom
from client.governance import approve

ROT = np.radians(20.0)  # in-plane rotation of patient 1's rows: a real affine test
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass
class Series:
    """What a test wrote: the datasets (in file order), raw pixels, identifiers."""

    datasets: list[Dataset] = field(default_factory=list)
    raw: list[np.ndarray] = field(default_factory=list)

    @property
    def uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)


@dataclass
class Patient:
    name: str
    pid: str
    birth: str
    study_uid: str = field(default_factory=generate_uid)
    accession: str = ""


def write_series(
    folder: Path,
    patient: Patient,
    number: int,
    *,
    n: int = 20,
    shape: tuple[int, int] = (12, 14),
    pixel_spacing: tuple[float, float] = (0.9, 0.7),
    dz: float = 2.5,
    orientation: tuple[float, ...] = AXIAL,
    modality: str = "CT",
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    slope: float = 1.0,
    intercept: float = -1024.0,
    skip: tuple[int, ...] = (),
    stack: tuple[float, float, float] | None = None,
    seed: int = 0,
) -> Series:
    """Single-frame slices with identifying headers, written in reverse
    position order with InstanceNumbers that do not follow position."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    direction = np.array(stack) if stack is not None else normal
    series_uid, frame_uid = generate_uid(), generate_uid()
    out = Series()
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        if k in skip:
            continue
        raw = rng.integers(600, 1400, size=shape).astype(np.uint16)
        pos = np.array([-40.0, 25.0, -300.0]) + k * dz * direction
        ds = Dataset()
        sop = generate_uid()
        sop_class = CTImageStorage if modality == "CT" else MRImageStorage
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = patient.study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName, ds.PatientID = patient.name, patient.pid
        ds.PatientBirthDate, ds.PatientSex = patient.birth, "F"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20230405"
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.AccessionNumber, ds.StudyID = patient.accession, "4711"
        ds.ReferringPhysicianName = "Hawthorne^Ingram"
        ds.SeriesDescription = f"{patient.name.replace('^', ' ')} ABDOMEN"
        ds.Manufacturer = "Synthetic"
        ds.Modality, ds.SeriesNumber = modality, number
        ds.InstanceNumber = (k * 7) % n + 1  # not the position order
        ds.ImageType = list(image_type)
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = raw.tobytes()
        out.datasets.append(ds)
        out.raw.append(raw)
    for ds in reversed(out.datasets):  # file order: neither position nor number
        ds.save_as(folder / f"IM{generate_uid()[-8:]}", enforce_file_format=True)
    return out


def write_seg(
    path: Path,
    series: Series,
    masks: dict[str, np.ndarray],
    number: int = 90,
    shift_mm: float = 0.0,
) -> None:
    """A binary SEG on ``series``; ``masks``: segment label -> (n, rows, cols)."""
    props = {
        "Kidney": (codes.SCT.Organ, codes.SCT.Kidney),
        "Tumour": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm),
        "Ureter": (codes.SCT.Organ, hd.sr.CodedConcept("87953007", "SCT", "Ureter")),
    }
    labelmap = np.zeros(next(iter(masks.values())).shape, np.uint8)
    descriptions = []
    for i, (label, mask) in enumerate(masks.items(), start=1):
        labelmap[mask] = i
        category, kind = props[label]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=i,
                segment_label=label,
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=series.datasets,
        pixel_array=labelmap,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Synthetic",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
    )
    if shift_mm:
        plane = seg.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0]
        plane.ImagePositionPatient[0] = float(plane.ImagePositionPatient[0]) + shift_mm
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)


def _box(n: int, shape: tuple[int, int], ks, rs, cs) -> np.ndarray:
    m = np.zeros((n, *shape), bool)
    m[ks, rs, cs] = True
    return m


PATIENTS = {
    "p1": Patient("Zabrowski^Henrietta", "MRN4711X", "19510203", accession="ACC998877"),
    "p2": Patient("Quillfeather^Osric", "MRN0815Y", "19600101", accession="ACC112233"),
    "p3": Patient(
        "Vantongeren^Gwendolyn", "MRN3333G", "19700707", accession="ACC333333"
    ),
    "p4": Patient("Marchetti^Tiberius", "MRN4444T", "19800808", accession="ACC444444"),
    "p5": Patient("Okonkwo^Philippa", "MRN5555N", "19900909", accession="ACC555555"),
    "p6": Patient("Lindqvist^Sigrun", "MRN6666S", "19450505", accession="ACC666666"),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One PACS export of six patients, imported once; logs and text captured."""
    tmp = tmp_path_factory.mktemp("dicom")
    src, out = tmp / "export", tmp / "site" / "kits"
    p = PATIENTS
    rot = (np.cos(ROT), np.sin(ROT), 0.0, -np.sin(ROT), np.cos(ROT), 0.0)
    mixed = src / "ZABROWSKI_H" / "all"  # one folder, three series, a name in the path
    wrote = {
        "p1": write_series(
            mixed,
            p["p1"],
            2,
            n=22,
            orientation=rot,
            slope=2.0,
            intercept=-2048.0,
            seed=1,
        ),
        "p1_thin": write_series(mixed, p["p1"], 3, n=24, dz=0.6, seed=2),
        "p1_mr": write_series(mixed, p["p1"], 5, modality="MR", seed=3),
        "p2": write_series(src / "b", p["p2"], 2, dz=5.0, seed=4),
        "p3": write_series(src / "c", p["p3"], 4, n=22, skip=(9,), seed=5),
        "p4": write_series(src / "d", p["p4"], 2, stack=_tilted(5.0), seed=6),
        "p5": write_series(src / "e", p["p5"], 2, seed=7),
        "p6": write_series(src / "f", p["p6"], 2, seed=8),
    }
    n1, shape = 22, (12, 14)
    kidney = _box(n1, shape, slice(5, 15), slice(2, 9), slice(3, 11))
    tumour = _box(n1, shape, slice(8, 11), slice(4, 6), slice(5, 8))
    write_seg(src / "seg" / "s1", wrote["p1"], {"Kidney": kidney, "Tumour": tumour})
    thin_kidney = _box(24, shape, slice(3, 9), slice(2, 5), slice(2, 5))
    write_seg(src / "seg" / "s1thin", wrote["p1_thin"], {"Kidney": thin_kidney}, 91)
    write_seg(
        src / "seg" / "s2", wrote["p2"], {"Kidney": _box(20, shape, 4, 3, slice(2, 6))}
    )
    p6_kidney = _box(20, shape, slice(4, 8), slice(2, 6), slice(2, 6))
    write_seg(src / "seg" / "s6", wrote["p6"], {"Kidney": p6_kidney}, shift_mm=3.0)
    _write_rtstruct(src / "rt" / "rs1", p["p5"])
    (src / "ZABROWSKI_H" / "notes.txt").write_text("Zabrowski^Henrietta MRN4711X")
    records: list[logging.LogRecord] = []
    handler = _ListHandler(records)
    loggers = [logging.getLogger(n) for n in ("", "client", "highdicom", "pydicom")]
    for lg in loggers:
        lg.addHandler(handler)
    levels = [lg.level for lg in loggers]
    for lg in loggers[1:]:  # highdicom logs UIDs at INFO: the import must hush it
        lg.setLevel(logging.DEBUG)
    try:
        summary = import_dicom(src, out, "HA")
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
    text = "\n".join(format_summary(summary))
    log_text = "\n".join(r.getMessage() for r in records)
    cases = {
        row["patient_id"]: row["case"]
        for row in csv.DictReader((tmp / "site" / PSEUDONYM_MAP).open())
    }
    return dict(
        tmp=tmp,
        src=src,
        out=out,
        summary=summary,
        text=text,
        log=log_text,
        wrote=wrote,
        cases=cases,
        kidney=kidney,
        tumour=tumour,
    )


class _ListHandler(logging.Handler):
    def __init__(self, records: list) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _tilted(degrees: float) -> tuple[float, float, float]:
    t = np.radians(degrees)
    return (0.0, float(np.sin(t)), float(np.cos(t)))


def _write_rtstruct(path: Path, patient: Patient) -> None:
    ds = Dataset()
    sop = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, sop
    ds.Modality, ds.SeriesNumber = "RTSTRUCT", 77
    ds.PatientName, ds.PatientID = patient.name, patient.pid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = patient.study_uid, generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _load(site, key: str, name: str = "imaging.nii.gz") -> nib.Nifti1Image:
    case = site["cases"][PATIENTS[key].pid]
    return nib.load(str(site["out"] / case / name))


def _sorted_slices(series: Series) -> list[int]:
    """Indices into series.datasets, ordered along the slice normal."""
    iop = np.array(series.datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    pos = [
        np.dot(np.array(d.ImagePositionPatient, float), normal) for d in series.datasets
    ]
    return list(np.argsort(pos))


def test_clean_ct_is_hu_with_the_dicom_geometry(site):
    series, img = site["wrote"]["p1"], _load(site, "p1")
    data = np.asanyarray(img.dataobj)
    assert data.dtype == np.int16 and data.shape == (14, 12, 22)  # cols, rows, slices
    assert np.allclose(img.header.get_zooms(), (0.7, 0.9, 2.5), atol=1e-4)
    order = _sorted_slices(series)
    for k in (0, 7, 21):  # a voxel's world position is its slice's, flipped
        ds, raw = series.datasets[order[k]], series.raw[order[k]]
        i, j = 5, 3  # column 5, row 3
        lps = np.array(ds.ImagePositionPatient, float)
        iop = np.array(ds.ImageOrientationPatient, float)
        lps = lps + i * 0.7 * iop[:3] + j * 0.9 * iop[3:]
        ras = img.affine @ np.array([i, j, k, 1.0])
        assert np.allclose(ras[:3], lps * [-1, -1, 1], atol=1e-3)
        assert data[i, j, k] == int(raw[j, i]) * 2 - 2048  # slope 2, intercept
    assert int(img.header["qform_code"]) == int(img.header["sform_code"]) == 1


def test_the_right_series_is_chosen_and_the_others_reported(site):
    s, w = site["summary"], site["wrote"]
    why = {p.what: p.reason for p in s.not_chosen}
    thin, mr = (f"uid …{w[k].uid[-6:]}" for k in ("p1_thin", "p1_mr"))
    assert any(thin in k and "ranks first" in v for k, v in why.items())
    assert any(mr in k and "modality MR, not CT" in v for k, v in why.items())
    assert f"series 2 (uid …{w['p1'].uid[-6:]}) chosen of 3 series" in site["log"]
    # the SEG drawn on the thin series is refused, not silently dropped
    assert any("not the series chosen" in p.reason for p in s.problems)


def test_gap_and_tilt_are_refused_naming_the_series(site):
    problems = {p.what: p for p in site["summary"].problems}
    gap = next(p for w, p in problems.items() if site["wrote"]["p3"].uid[-6:] in w)
    assert "gap of 5.00 mm between sorted slices 8 and 9" in gap.reason
    assert "about 1 slice(s) missing" in gap.reason and "re-export" in gap.fix
    tilt = next(p for w, p in problems.items() if site["wrote"]["p4"].uid[-6:] in w)
    assert "gantry tilt" in tilt.reason and "5.0 degrees" in tilt.reason
    assert PATIENTS["p3"].pid not in site["cases"]
    assert PATIENTS["p4"].pid not in site["cases"]
    assert "PROBLEMS" in site["text"] and "RTSTRUCT" in site["text"]


def test_seg_labels_land_on_the_right_voxels(site):
    series = site["wrote"]["p1"]
    seg = _load(site, "p1", "segmentation.nii.gz")
    img = _load(site, "p1")
    assert np.array_equal(seg.affine, img.affine)
    labels = np.asanyarray(seg.dataobj)
    order = _sorted_slices(series)
    # file order k -> sorted index; masks are (slice, row, col) in file order
    expect = np.zeros((22, 12, 14), np.uint8)
    expect[site["kidney"]] = 1
    expect[site["tumour"]] = 2  # tumour painted over kidney
    assert np.array_equal(labels, expect[order].transpose(2, 1, 0))
    assert (labels == 2).sum() == site["tumour"].sum()


def test_misaligned_seg_is_refused_and_the_case_stays_unlabelled(site):
    case = site["cases"][PATIENTS["p6"].pid]
    assert (site["out"] / case / "imaging.nii.gz").is_file()
    assert not (site["out"] / case / "segmentation.nii.gz").exists()
    assert any(
        "lies 3.00 mm from the image" in p.reason for p in site["summary"].problems
    )


def test_no_identifier_reaches_an_output_or_a_log(site):
    ids = []
    for p in PATIENTS.values():
        ids += [p.name, *p.name.split("^"), p.pid, p.birth, p.accession, p.study_uid]
    ids += ["20230405", "Hawthorne^Ingram", "ZABROWSKI_H", "ABDOMEN"]
    for series in site["wrote"].values():
        ids.append(series.uid)
        ids += [str(d.SOPInstanceUID) for d in series.datasets]
        ids.append(str(series.datasets[0].FrameOfReferenceUID))
    blobs = {"summary text": site["text"], "log": site["log"]}
    for path in site["out"].rglob("*"):
        blobs[f"name {path}"] = str(path.relative_to(site["out"]))
        if path.is_file():
            raw = path.read_bytes()
            raw = gzip.decompress(raw) if path.name.endswith(".gz") else raw
            blobs[str(path)] = raw.decode("latin-1")
    assert len(blobs) > 8
    for where, text in blobs.items():
        for value in ids:
            assert value.lower() not in text.lower(), (value, where)
    pmap = site["tmp"] / "site" / PSEUDONYM_MAP  # the one link back: outside OUT
    assert PATIENTS["p1"].pid in pmap.read_text() and pmap.stat().st_mode & 0o077 == 0


def test_the_output_passes_the_site_check(site):
    from client.readiness import check_site  # torch: only this test needs it

    doc = {
        "name": "hospital-dicom",
        "data": {"root": str(site["out"])},
        "device": "cpu",
        "state_dir": str(site["tmp"] / "state"),
        "privacy": {
            "enabled": True,
            "max_epsilon": 100.0,
            "delta": 1e-3,
            "min_cases_for_aggregates": 1,
        },
    }
    path = site["tmp"] / "site.yaml"
    path.write_text(yaml.safe_dump(doc))
    approve(path, sha256="ab" * 32)
    report = check_site(path)
    assert report.layout == "kits23"
    assert [f for f in report.findings if f.severity == "error"] == []
    assert report.ok and report.cases_found == 4 and report.cases_usable == 2
    unlabelled = {site["cases"][PATIENTS[k].pid] for k in ("p5", "p6")}
    assert set(report.cases_unlabelled) == unlabelled


def test_rerun_skips_finished_cases_and_adds_a_new_seg(tmp_path, capsys):
    src, out = tmp_path / "export", tmp_path / "data" / "site"
    pat = Patient("Again^Anna", "MRN7777A", "19770707")
    series = write_series(src / "a", pat, 2, n=8, seed=9)
    args = [
        "site",
        "import-dicom",
        str(src),
        str(out),
        "--pseudonym-prefix",
        "R",
        "--min-slices",
        "8",
    ]
    assert kidneyfl(args) == 0
    image = out / "case_R00000" / "imaging.nii.gz"
    first = image.stat().st_mtime_ns
    assert kidneyfl(args) == 0
    assert image.stat().st_mtime_ns == first
    assert "case_R00000: imported before, kept" in capsys.readouterr().out
    # a SEG with an unknown segment is refused until the segment map maps it
    mask = _box(8, (12, 14), slice(2, 5), slice(3, 7), slice(3, 7))
    write_seg(src / "seg", series, {"Ureter": mask, "Kidney": mask.copy()})
    assert kidneyfl(args) == 1
    assert "'Ureter' (SCT:87953007 Ureter) map to no kidneyfl label" in (
        capsys.readouterr().out
    )
    seg_map = tmp_path / "segments.csv"
    seg_map.write_text("segment,label\nureter,background\n")
    assert kidneyfl([*args, "--segment-map", str(seg_map)]) == 0
    assert "segmentation added" in capsys.readouterr().out
    labels = np.asanyarray(
        nib.load(str(image.with_name("segmentation.nii.gz"))).dataobj
    )
    assert set(np.unique(labels)) == {0, 1} and image.stat().st_mtime_ns == first


def test_mr_only_with_modality_mr(tmp_path):
    src = tmp_path / "export"
    write_series(
        src,
        Patient("Mr^Max", "MRN8888M", "19880808"),
        3,
        n=8,
        modality="MR",
        slope=0.5,
        intercept=0.0,
    )
    ct = import_dicom(src, tmp_path / "ct" / "out", "M", min_slices=8)
    assert not ct.cases and "modality MR, not CT" in ct.problems[0].reason
    assert "--modality MR" in ct.problems[0].fix
    mr = import_dicom(src, tmp_path / "mr" / "out", "M", modality="MR", min_slices=8)
    img = nib.load(str(tmp_path / "mr" / "out" / "case_M00000" / "imaging.nii.gz"))
    assert img.get_data_dtype() == np.float32 and mr.cases[0].status == "written"


def _headers(zs, orientation=AXIAL, image_type=("ORIGINAL", "PRIMARY")):
    """A series of headers only (no files): slices at heights ``zs``."""
    from client.data.dicom_series import Series as DicomSeries
    from client.data.dicom_series import Slice

    slices = [
        Slice(
            Path(f"x{k}"), f"1.2.{k}", (0.0, 0.0, z), orientation, (0.8, 0.8), (4, 4), 1
        )
        for k, z in enumerate(zs)
    ]
    return DicomSeries("1.2.3.4.5.6789", "1.2.3", "p", "CT", 7, image_type, slices)


@pytest.mark.parametrize(
    ("series", "reason"),
    [
        (_headers([0, 2.5, 5.0, 7.9, 10.0, 12.5]), "irregular slice spacing"),
        (_headers([0, 2.5, 2.5, 5.0, 7.5, 10.0]), "two or more slices at one"),
        (_headers(range(6), (1, 0, 0, 0, 0, -1)), "not axial: the slice normal is 90"),
        (_headers(range(6), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), "scout"),
        (_headers(range(3)), r"3 slice\(s\), fewer than 6"),
    ],
)
def test_series_rules_refuse_with_a_reason(series, reason):
    from client.data.dicom_series import SeriesRefused, series_geometry

    with pytest.raises(SeriesRefused, match=reason) as refused:
        series_geometry(series, "CT", min_slices=6)
    assert refused.value.fix and series.label == "series 7 (uid …5.6789)"


def test_a_bad_segment_map_names_the_file_and_row(tmp_path):
    from client.data.dicom_seg import read_segment_map
    from client.data.errors import SiteDataError

    path = tmp_path / "map.csv"
    path.write_text("segment,label\nSCT:64033007,kidney\n*,background\nUreter,liver\n")
    with pytest.raises(SiteDataError, match=r"map.csv: row 4: expected"):
        read_segment_map(path)
    path.write_text("segment,label\nSCT:64033007,Kidney\nLeft_Kidney,tumor\n")
    assert read_segment_map(path) == {"SCT:64033007": 1, "left kidney": 2}
