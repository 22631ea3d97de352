"""``kidneyfl site import-dicom``: a folder of DICOM series -> a KiTS-style site.

One case per patient: for each patient (PatientID; a study whose export blanked
it is its own patient) the usable image series are ranked by the rules of
:mod:`client.data.dicom_series` and the best becomes
``OUT/case_<prefix><n>/imaging.nii.gz``; a DICOM SEG drawn on it becomes
``segmentation.nii.gz`` (:mod:`client.data.dicom_seg`). Cases without a SEG
have no segmentation file, which the KiTS layout lists as unlabelled
(prediction only).

De-identification: the NIfTI files hold voxels, the affine and nothing else
(empty description, intent name and aux file); case folders are pseudonyms
numbered in an order drawn from a hash, not from names, IDs or dates. The only
link back to patients is the pseudonym map (default ``OUT/../pseudonym-map.csv``,
outside the dataset), which must stay at the site; reruns read it so a patient
keeps its pseudonym and finished cases are skipped.

Writes are atomic (segmentation first, imaging last: a case is finished when
its imaging file exists); one bad series never stops the others, and every
refusal is returned with its reason and fix.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from client.data.dicom_seg import (
    LABEL_NAMES,
    SegObject,
    load_segs,
    read_segment_map,
    rtstruct_problems,
    seg_labels,
    unused_seg,
)
from client.data.dicom_series import (
    MIN_SLICES,
    Geometry,
    Problem,
    Series,
    SeriesRefused,
    quiet_dicom_libraries,
    rank_key,
    read_volume,
    scan_folder,
    scrub,
    series_geometry,
    why_not,
)
from client.data.errors import SiteDataError
from common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

MODALITIES = ("CT", "MR")
PSEUDONYM_MAP = "pseudonym-map.csv"
SUMMARY = "dicom-import.json"
_IMG, _SEG = "imaging.nii.gz", "segmentation.nii.gz"
_MAP_COLUMNS = ("case", "patient_id", "study_uid", "series_uid")
_PREFIX = re.compile(r"[A-Za-z0-9-]{0,16}")


@dataclass
class CaseResult:
    """A case as the import left it (what was kept, nothing identifying)."""

    case_id: str
    status: str  # "written", "kept" (finished before), "segmentation added"
    modality: str = ""
    shape: tuple[int, ...] = ()
    spacing_mm: tuple[float, ...] = ()
    label_voxels: dict[str, int] = field(default_factory=dict)  # empty: unlabelled


@dataclass
class ImportSummary:
    """What :func:`import_dicom` did."""

    out: Path
    pseudonym_map: Path
    modality: str
    cases: list[CaseResult] = field(default_factory=list)
    not_chosen: list[Problem] = field(default_factory=list)  # other series, why
    problems: list[Problem] = field(default_factory=list)  # nothing written
    not_dicom: int = 0


def import_dicom(
    src: Path,
    out: Path,
    pseudonym_prefix: str,
    modality: str = "CT",
    min_slices: int = MIN_SLICES,
    segment_map: Path | None = None,
    pseudonym_map: Path | None = None,
) -> ImportSummary:
    """Convert the DICOM series under ``src`` into a KiTS-style site in ``out``.

    Parameters
    ----------
    src : Path
        Folder of DICOM files, any depth and naming (a PACS export).
    out : Path
        The site's data root; point ``data.root`` of the site YAML here.
    pseudonym_prefix : str
        Case folders are ``case_<prefix><nnnnn>``; letters, digits, ``-``.
    modality : str
        ``CT`` (stored as int16 HU) or ``MR`` (float32), for a site that
        declared MR.
    min_slices : int
        Fewest slices a series may have.
    segment_map : Path, optional
        CSV ``segment,label`` mapping SEG segments to kidneyfl labels.
    pseudonym_map : Path, optional
        Where the pseudonym map is kept; default ``out/../pseudonym-map.csv``.

    Returns
    -------
    ImportSummary
        Cases written or kept, series not chosen and problems, each with why.

    Raises
    ------
    SiteDataError
        Unusable arguments (the message names the fix); never for bad series.
    """
    src, out = Path(src), Path(out)
    map_path = _check_args(src, out, pseudonym_prefix, modality, pseudonym_map)
    if min_slices < 2:
        raise SiteDataError(f"--min-slices {min_slices}: use 2 or more")
    seg_map = read_segment_map(segment_map) if segment_map else {}
    run = _Run(ImportSummary(out, map_path, modality), seg_map, pseudonym_prefix)
    run.min_slices = min_slices
    with quiet_dicom_libraries():
        scan = scan_folder(src)
        run.summary.not_dicom = scan.not_dicom
        run.segs, refused = load_segs(scan.seg_files)
        run.summary.problems += refused
        run.entries = _read_map(map_path)
        patients: dict[str, list[Series]] = {}
        for series in scan.series.values():
            patients.setdefault(series.patient_key, []).append(series)
        # Numbers follow a hash of the patient key: no order by name, ID or date.
        for key in sorted(patients, key=lambda k: hashlib.sha256(k.encode()).digest()):
            try:
                _import_patient(run, key, patients[key])
            except OSError:
                raise  # disk full, permissions: nothing later would fare better
            except Exception as exc:  # odd headers of one patient stop no other
                run.summary.problems.append(_unexpected(patients[key], exc))
    for uid, objs in run.segs.items():
        if uid not in run.used:
            series = scan.series.get(uid)
            run.summary.problems += [unused_seg(o, series) for o in objs]
    run.summary.problems += rtstruct_problems(scan.rtstruct)
    run.summary.not_chosen += [
        Problem(f"{n} {modality} object(s)", "not images", "none")
        for modality, n in sorted(scan.other.items())
    ]
    if not scan.series and not scan.seg_files:
        run.summary.problems.append(
            Problem(
                "the export",
                f"no DICOM image found ({scan.not_dicom} file(s) are not DICOM)",
                "point SRC at the folder the PACS export wrote",
            )
        )
    _write_summary(run.summary)
    return run.summary


@dataclass
class _Run:
    """One import's options and running state."""

    summary: ImportSummary
    seg_map: dict[str, int]
    prefix: str
    min_slices: int = MIN_SLICES
    segs: dict[str, list[SegObject]] = field(default_factory=dict)  # by series
    entries: dict[str, dict[str, str]] = field(default_factory=dict)  # by patient
    used: set[str] = field(default_factory=set)  # series whose SEGs were applied


def _check_args(
    src: Path, out: Path, prefix: str, modality: str, map_path: Path | None
) -> Path:
    if not src.is_dir():
        raise SiteDataError(f"{src}: not a folder; pass the folder of DICOM files")
    if modality not in MODALITIES:
        raise SiteDataError(f"--modality {modality!r}: use CT or MR")
    if not _PREFIX.fullmatch(prefix):
        raise SiteDataError(
            f"--pseudonym-prefix {prefix!r}: use up to 16 letters, digits or '-' "
            "(never a name, ID or date)"
        )
    path = Path(map_path) if map_path else out.parent / PSEUDONYM_MAP
    if path.resolve().is_relative_to(out.resolve()):
        raise SiteDataError(
            f"{path}: the pseudonym map must not be inside {out} (the dataset); "
            "put it next to it or in the site's state folder"
        )
    return path


def _import_patient(run: _Run, key: str, candidates: list[Series]) -> None:
    summary, entry = run.summary, run.entries.get(key)
    if entry and (summary.out / entry["case"] / _IMG).is_file():
        _finished(run, entry, candidates)
        return
    usable: dict[str, Geometry] = {}
    refused: list[Problem] = []
    for s in sorted(candidates, key=lambda s: (s.number or 0, s.uid)):
        try:
            usable[s.uid] = series_geometry(s, summary.modality, run.min_slices)
        except SeriesRefused as exc:
            refused.append(Problem(s.label, exc.reason, exc.fix))
    ranked = sorted(
        (rank_key(s, usable[s.uid], s.uid in run.segs), s)
        for s in candidates
        if s.uid in usable
    )
    if not ranked:
        summary.problems += refused
        return
    (best, chosen), others = ranked[0], ranked[1:]
    geom = usable[chosen.uid]
    try:
        volume = read_volume(geom, summary.modality)
    except SeriesRefused as exc:
        summary.problems += [Problem(chosen.label, exc.reason, exc.fix), *refused]
        return
    labels = _labels(run, chosen, geom)
    case_id = entry["case"] if entry else _new_case_id(run.entries, run.prefix)
    row = (case_id, key, chosen.study_uid, chosen.uid)
    run.entries[key] = dict(zip(_MAP_COLUMNS, row, strict=True))
    _write_map(summary.pseudonym_map, run.entries)  # before the files: rerun-safe
    summary.cases.append(_write_case(summary, case_id, volume, labels, geom))
    summary.not_chosen += refused
    summary.not_chosen += [
        Problem(
            s.label,
            f"{chosen.label} ranks first (this one: {why_not(best, k)})",
            "none",
        )
        for k, s in others
    ]
    log.info(
        "%s: %s chosen of %d series (%s, %.2f mm slices, %d slices, %s)",
        case_id,
        chosen.label,
        len(candidates),
        "ORIGINAL/PRIMARY" if chosen.original_primary else "DERIVED/SECONDARY",
        geom.spacing[2],
        len(geom.slices),
        "labelled" if labels is not None else "unlabelled",
    )


def _labels(run: _Run, series: Series, geom: Geometry) -> np.ndarray | None:
    """The series' SEG label map; a refused SEG leaves the case unlabelled."""
    objs = run.segs.get(series.uid)
    if not objs:
        return None
    run.used.add(series.uid)
    try:
        return seg_labels(objs, geom, run.seg_map)
    except SeriesRefused as exc:
        what = exc.what or objs[0].label
        run.summary.problems.append(Problem(what, exc.reason, exc.fix))
        return None


def _finished(run: _Run, entry: dict[str, str], candidates: list[Series]) -> None:
    """A case imported before: kept; a SEG that arrived since is added."""
    case_dir = run.summary.out / entry["case"]
    result = CaseResult(entry["case"], "kept")
    series = next((s for s in candidates if s.uid == entry["series_uid"]), None)
    if series is not None:
        run.used.add(series.uid)
    if series is not None and series.uid in run.segs and not (case_dir / _SEG).exists():
        try:
            geom = series_geometry(series, run.summary.modality, run.min_slices)
        except SeriesRefused as exc:  # the rules changed since (--min-slices)
            run.summary.problems.append(Problem(series.label, exc.reason, exc.fix))
            geom = None
        labels = _labels(run, series, geom) if geom is not None else None
        if geom is not None and labels is not None:
            _save(case_dir / _SEG, labels, geom.affine)
            result = CaseResult(entry["case"], "segmentation added")
            result.label_voxels = _counts(labels)
    run.summary.cases.append(result)


def _new_case_id(entries: dict[str, dict[str, str]], prefix: str) -> str:
    pattern = re.compile(rf"case_{re.escape(prefix)}(\d+)")
    taken = [
        int(m.group(1)) for e in entries.values() if (m := pattern.fullmatch(e["case"]))
    ]
    return f"case_{prefix}{max(taken, default=-1) + 1:05d}"


def _write_case(
    summary: ImportSummary,
    case_id: str,
    volume: np.ndarray,
    labels: np.ndarray | None,
    geom: Geometry,
) -> CaseResult:
    case_dir = summary.out / case_id
    if labels is not None:
        _save(case_dir / _SEG, labels, geom.affine)
    _save(case_dir / _IMG, volume, geom.affine)  # last: marks the case finished
    return CaseResult(
        case_id,
        "written",
        summary.modality,
        tuple(volume.shape),
        tuple(round(z, 4) for z in geom.spacing),
        _counts(labels) if labels is not None else {},
    )


def _counts(labels: np.ndarray) -> dict[str, int]:
    values, counts = np.unique(labels, return_counts=True)
    return {
        LABEL_NAMES[int(v)]: int(c)
        for v, c in zip(values, counts, strict=True)
        if int(v) in LABEL_NAMES
    }


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    """An atomic .nii.gz whose header holds geometry only (no text fields)."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)  # scanner coordinates
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    for text in ("descrip", "intent_name", "aux_file", "db_name"):
        img.header[text] = b""
    atomic_write_bytes(path, img.to_bytes(), compress=True)


def _read_map(path: Path) -> dict[str, dict[str, str]]:
    if not path.is_file():
        return {}
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SiteDataError(
            f"{path}: cannot read the pseudonym map ({type(exc).__name__}); restore "
            "it from the site's backup (without it, reruns number patients anew)"
        ) from None
    if rows and set(rows[0]) != set(_MAP_COLUMNS):
        raise SiteDataError(
            f"{path}: header is not {','.join(_MAP_COLUMNS)}; restore the file "
            "kidneyfl wrote, or pass another --pseudonym-map"
        )
    return {r["patient_id"]: r for r in rows}


def _write_map(path: Path, entries: dict[str, dict[str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_MAP_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(entries.values(), key=lambda e: e["case"]))
    atomic_write_text(path, buf.getvalue())  # a mkstemp file: mode 0600


def _unexpected(series: list[Series], exc: Exception) -> Problem:
    return Problem(
        ", ".join(s.label for s in series),
        f"unexpected {type(exc).__name__} ({scrub(str(exc))})",
        "export these series again; if it persists, report the message (not the "
        "images) to the kidneyfl maintainers",
    )


def _write_summary(summary: ImportSummary) -> None:
    path = summary.out / SUMMARY
    old: dict[str, dict] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8")).get("cases", {})
        except (OSError, ValueError, AttributeError):
            old = {}
    for case in summary.cases:  # cases kept from an earlier run keep their entry
        if case.status == "written" or case.case_id not in old:
            old[case.case_id] = asdict(case)
        elif case.label_voxels:
            old[case.case_id]["label_voxels"] = case.label_voxels
    atomic_write_json(path, {"modality": summary.modality, "cases": old})


def format_summary(summary: ImportSummary) -> list[str]:
    """Lines for the terminal: cases and what they kept, then the rest."""
    unit = "int16 HU" if summary.modality == "CT" else "float32"
    lines = [f"kidneyfl import-dicom into {summary.out} ({summary.modality}, {unit})"]
    for c in summary.cases:
        if c.status == "kept":
            lines.append(f"  {c.case_id}: imported before, kept")
            continue
        labels = ", ".join(c.label_voxels) or "unlabelled (prediction only)"
        geometry = (
            f"{'x'.join(map(str, c.shape))} voxels, spacing "
            f"{'x'.join(f'{z:.2f}' for z in c.spacing_mm)} mm, "
            if c.shape
            else ""
        )
        lines.append(f"  {c.case_id}: {c.status}, {geometry}{labels}")
    if summary.not_chosen:
        lines.append(f"not imported, as the rules say ({len(summary.not_chosen)}):")
        lines += [
            f"  {p.what}: {p.reason}" + ("" if p.fix == "none" else f"; fix: {p.fix}")
            for p in summary.not_chosen
        ]
    if summary.not_dicom:
        lines.append(
            f"{summary.not_dicom} file(s) are not DICOM or not readable as DICOM "
            "(skipped)"
        )
    if summary.problems:
        lines.append(
            f"PROBLEMS ({len(summary.problems)}): fix them and rerun (finished "
            "cases are skipped)"
        )
        lines += [f"  {p.line()}" for p in summary.problems]
    lines.append(
        "kept: voxels, spacing, orientation, slice count, modality; not kept: "
        "names, IDs, dates, UIDs, descriptions"
    )
    lines.append(
        f"pseudonym map {summary.pseudonym_map}: it links cases to patients; it "
        "must stay at the site and never travel with the data"
    )
    return lines
