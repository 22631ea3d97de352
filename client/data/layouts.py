"""Dataset layouts (KiTS, MSD, nnU-Net v2, CSV manifest) as one case list.

Discovery only lists files and never opens a NIfTI: it stays fast on thousands
of cases, and a missing or corrupt file is reported by the readiness check
rather than silently dropped here. Each layout also yields a label map from the
dataset's values to kidneyfl's (0 background, 1 kidney, 2 tumour, 3 cyst).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from client.tasks.segmentation.data import Case, SiteDataError
from common.metrics import LABELS

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "kits19", "kits21", "kits23", "msd", "nnunet", "manifest")
KIDNEYFL_LABELS = {name: value for value, name in LABELS.items()}
SPLITS = ("train", "validation", "test")
MANIFEST_HEADER = "image,label[,split][,patient]"
_MANIFEST_OPTIONAL = {"split", "patient"}

# Dataset label names (after _norm) that need no data.label_names entry.
_ALIASES = {
    "background": ("background", "bg"),
    "kidney": ("kidney",),
    "tumour": ("tumour", "tumor", "kidney_tumor", "kidney_tumour", "cancer", "mass"),
    "cyst": ("cyst", "kidney_cyst"),
}
_DEFAULT_NAMES = {alias: k for k, names in _ALIASES.items() for alias in names}
# nnU-Net's KiTS21/23 conversion (e.g. Dataset220_KiTS2023) trains on nested
# regions, but its label files keep the KiTS values 0-3; the voxels in "masses"
# that are not "tumor" are the cysts.
_KITS_REGIONS = {"background": [0], "kidney": [1, 2, 3], "masses": [2, 3], "tumor": [2]}
_KITS_REGION_VALUES = {"background": 0, "kidney": 1, "tumor": 2, "masses": 3}
_KITS_NAMES = [("background", 0), ("kidney", 1), ("tumor", 2), ("cyst", 3)]
_IMG, _SEG, _MAJ = "imaging.nii.gz", "segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz"


@dataclass(frozen=True)
class Discovered:
    """What :func:`discover` found: every listed case, labelled or not, whose
    files may be missing (the readiness check reports those)."""

    layout: str  # the concrete layout, never "auto"
    cases: list[Case]
    # Dataset label value -> kidneyfl label 0-3; other values fail at check time.
    label_map: dict[int, int]
    notes: list[str]  # remarks for the site operator
    splits: dict[str, str] = field(default_factory=dict)  # case id -> split (CSV)


@dataclass
class _Parsed:
    cases: list[Case]
    names: list[tuple[str, int]]  # dataset label (name, value) pairs
    source: str  # where the label names come from, for error messages
    notes: list[str] = field(default_factory=list)
    splits: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)  # layout-specific names


def discover(
    root: Path,
    layout: str = "auto",
    label_names: dict[str, str] | None = None,
    manifest: Path | None = None,
) -> Discovered:
    """List a site's cases and their label map, whatever the dataset layout.

    Parameters
    ----------
    root : Path
        The dataset folder (``data.root``).
    layout : str
        One of :data:`LAYOUTS`. ``"auto"`` picks, in order: ``root/manifest.csv``;
        a ``dataset.json`` in ``root`` or its one ``Dataset*``/``Task*`` folder
        (nnU-Net if it has ``channel_names``, else MSD); ``case_*`` folders
        (KiTS21 if any ``aggregated_MAJ_seg.nii.gz`` exists, else KiTS23).
    label_names : dict of str to str, optional
        Dataset label name -> kidneyfl name (background, kidney, tumour, cyst),
        matched case-insensitively. Names left out fall back to common
        spellings (bg, tumor, kidney_tumor, kidney_cyst, ...).
    manifest : Path, optional
        CSV manifest (implies the manifest layout); default ``root/manifest.csv``.

    Returns
    -------
    Discovered
        The layout found, the cases, the label map and remarks.

    Raises
    ------
    SiteDataError
        If the layout is unknown or not found, or its metadata is unusable;
        the message names the file and the fix.
    """
    if layout not in LAYOUTS:
        raise SiteDataError(
            f"data.layout {layout!r} is unknown; use one of {', '.join(LAYOUTS)}"
        )
    if manifest is not None and layout not in ("auto", "manifest"):
        raise SiteDataError(
            f"data.manifest is set but data.layout is {layout!r}; set data.layout "
            "to manifest (or auto), or remove data.manifest"
        )
    root = Path(root)
    if manifest is not None:
        layout = "manifest"
    elif layout == "auto":
        layout = _detect(root)
    else:
        _require_dir(root)
    if layout == "manifest":
        parsed = _manifest(Path(manifest) if manifest else root / "manifest.csv")
    elif layout in ("msd", "nnunet"):
        parsed = _msd(root) if layout == "msd" else _nnunet(root)
    else:
        parsed = _kits(root, layout)
    label_map = _label_map(parsed.names, label_names, parsed.source, parsed.defaults)
    n_labelled = sum(c.label is not None for c in parsed.cases)
    log.info("layout %s: %d cases (%d labelled)", layout, len(parsed.cases), n_labelled)
    return Discovered(layout, parsed.cases, label_map, parsed.notes, parsed.splits)


def remap_labels(array: np.ndarray, label_map: dict[int, int]) -> np.ndarray:
    """Map dataset label values to kidneyfl labels with a lookup table.

    Parameters
    ----------
    array : numpy.ndarray
        Label volume; integer, or float holding whole numbers (NIfTI scaling).
    label_map : dict of int to int
        Dataset value -> kidneyfl label, as in :attr:`Discovered.label_map`.

    Returns
    -------
    numpy.ndarray
        Same shape, dtype ``uint8``.

    Raises
    ------
    ValueError
        If the array holds values not in the map, naming them.
    """
    arr = np.asarray(array)
    if not label_map or min(label_map) < 0:
        raise ValueError(f"label map {label_map} needs non-negative dataset values")
    if not np.issubdtype(arr.dtype, np.integer):
        fractional = arr != np.round(arr)
        if fractional.any():
            bad = np.unique(arr[fractional])[:10].tolist()
            raise ValueError(f"label values {bad} are not whole numbers")
    ints = arr.astype(np.int64)
    lut = np.full(max(label_map) + 1, -1, dtype=np.int16)
    lut[list(label_map)] = list(label_map.values())
    out = lut[np.clip(ints, 0, lut.size - 1)]
    out[(ints < 0) | (ints >= lut.size)] = -1  # clipping must not hide them
    if (out < 0).any():
        bad = np.unique(ints[out < 0]).tolist()
        raise ValueError(
            f"label values {bad} are not in the label map {sorted(label_map)}; "
            "map them with data.label_names in the site YAML"
        )
    return out.astype(np.uint8)


def _detect(root: Path) -> str:
    _require_dir(root)
    if (root / "manifest.csv").is_file():
        return "manifest"
    ds = _dataset_json(root, ("Dataset", "Task"))
    if ds is not None:
        meta = _read_json(ds)
        if "channel_names" in meta:
            return "nnunet"
        if "modality" in meta or "training" in meta:
            return "msd"
        raise SiteDataError(
            f"{ds}: neither nnU-Net v2 (channel_names) nor MSD (modality, "
            "training); set data.layout in the site YAML"
        )
    dirs = _case_dirs(root)
    if dirs:
        return "kits21" if any((d / _MAJ).exists() for d in dirs) else "kits23"
    raise SiteDataError(
        f"no dataset recognised under {root}: looked for manifest.csv, dataset.json "
        "(there or in one Dataset*/Task* subfolder) and case_*/imaging.nii.gz "
        "folders (KiTS). Point data.root at the dataset, or set data.layout "
        f"({', '.join(LAYOUTS[1:])}) or data.manifest"
    )


def _require_dir(root: Path) -> None:
    if not root.is_dir():
        raise SiteDataError(
            f"data root {root} does not exist or is not a folder; set data.root in "
            "the site YAML to the dataset folder"
        )


def _case_dirs(root: Path) -> list[Path]:
    # Folders without imaging are kept: KiTS21/23 ship the CT separately, and a
    # forgotten download must show up in the check, not vanish.
    return sorted(
        d
        for d in root.iterdir()
        if d.is_dir()
        and (d.name.startswith("case_") or (d / _IMG).exists())
        and any((d / f).exists() for f in (_IMG, _SEG, _MAJ))
    )


def _kits(root: Path, layout: str) -> _Parsed:
    dirs = _case_dirs(root)
    if not dirs:
        raise SiteDataError(
            f"no KiTS case folders (case_XXXXX/imaging.nii.gz) under {root}; set "
            "data.root to the folder holding them, or set data.layout"
        )
    seg_files = (_MAJ, _SEG) if layout == "kits21" else (_SEG,)
    cases = [
        Case(
            d.name, d / _IMG, next((d / f for f in seg_files if (d / f).exists()), None)
        )
        for d in dirs
    ]
    notes = []
    if no_image := sum(not c.image.exists() for c in cases):
        notes.append(
            f"{no_image} case folder(s) have no imaging.nii.gz; KiTS distributes the "
            "CT separately, so run the dataset's imaging download"
        )
    if layout != "kits19":
        return _Parsed(cases, _KITS_NAMES, f"the {layout} layout", notes)
    notes.append("KiTS19 has no cyst label: labels are 0 background, 1, 2 only")
    notes.append(
        "KiTS19 arrays are stored slices-first (orientation I,P,L per the header "
        "affine); the pipeline reorients them from the affine, so leave the files "
        "as they are"
    )
    return _Parsed(cases, _KITS_NAMES[:3], "the kits19 layout", notes)


def _dataset_json(root: Path, prefixes: tuple[str, ...]) -> Path | None:
    if (root / "dataset.json").is_file():
        return root / "dataset.json"
    found = sorted(
        d / "dataset.json"
        for d in root.iterdir()
        if d.is_dir() and d.name.startswith(prefixes) and (d / "dataset.json").is_file()
    )
    if len(found) > 1:
        names = ", ".join(p.parent.name for p in found)
        raise SiteDataError(
            f"{root} holds several datasets ({names}); set data.root to one of them"
        )
    return found[0] if found else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SiteDataError(f"{path}: cannot read JSON ({exc}); fix the file") from None
    if not isinstance(meta, dict):
        raise SiteDataError(f"{path}: expected a JSON object at the top level")
    return meta


def _dataset(root: Path, prefix: str) -> tuple[Path, dict[str, Any]]:
    """The dataset.json of an MSD or nnU-Net dataset, checked for one channel."""
    ds = _dataset_json(root, (prefix,))
    if ds is None:
        raise SiteDataError(
            f"no dataset.json in {root} or in a {prefix}* subfolder; set data.root "
            "to the dataset folder"
        )
    meta = _read_json(ds)
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if len(channels) > 1:
        raise SiteDataError(
            f"{ds}: the dataset has {len(channels)} input channels ({channels}); "
            "kidneyfl uses one CT channel, so point data.root at a single-channel "
            "CT dataset"
        )
    return ds, meta


def _msd(root: Path) -> _Parsed:
    ds, meta = _dataset(root, "Task")
    labels, training = meta.get("labels"), meta.get("training")
    if not labels or not isinstance(labels, dict) or not all(map(str.isdigit, labels)):
        raise SiteDataError(
            f'{ds}: "labels" must map values to names, e.g. {{"0": "background", '
            '"1": "kidney"}'
        )
    if not isinstance(training, list) or not all(
        isinstance(t, dict) and "image" in t for t in training
    ):
        raise SiteDataError(
            f'{ds}: "training" must list {{"image": ..., "label": ...}} entries'
        )
    entries = [(t["image"], t.get("label")) for t in training]
    entries += [
        (t["image"] if isinstance(t, dict) else t, None) for t in meta.get("test") or []
    ]
    # MSD tarballs made on macOS carry "._" resource forks next to each file.
    entries = [(i, lab) for i, lab in entries if not Path(i).name.startswith("._")]
    ids = _dedupe([_stem(Path(i)) for i, _ in entries])
    task = ds.parent
    cases = [
        Case(cid, task / i, task / lab if lab else None)
        for cid, (i, lab) in zip(ids, entries, strict=True)
    ]
    names = [(str(name), int(value)) for value, name in labels.items()]
    return _Parsed(cases, names, str(ds))


def _nnunet(root: Path) -> _Parsed:
    ds, meta = _dataset(root, "Dataset")
    base, ending = ds.parent, meta.get("file_ending", ".nii.gz")
    if ending not in (".nii.gz", ".nii"):
        raise SiteDataError(
            f"{ds}: file_ending {ending!r}; kidneyfl reads NIfTI (.nii.gz or .nii), "
            "so convert the files or list them in a manifest"
        )
    names, defaults, notes = _nnunet_labels(meta.get("labels"), ds)
    image = "_0000" + ending
    # A label without its image is listed too: the check reports the gap.
    train = sorted({*_ids(base / "imagesTr", image), *_ids(base / "labelsTr", ending)})
    test = sorted(_ids(base / "imagesTs", image))
    entries = [
        (base / "imagesTr" / f"{i}{image}", base / "labelsTr" / f"{i}{ending}")
        for i in train
    ] + [(base / "imagesTs" / f"{i}{image}", None) for i in test]
    cases = [
        Case(cid, img, lab if lab is not None and lab.exists() else None)
        for cid, (img, lab) in zip(_dedupe(train + test), entries, strict=True)
    ]
    return _Parsed(cases, names, str(ds), notes, defaults=defaults)


def _ids(folder: Path, suffix: str) -> list[str]:
    if not folder.is_dir():
        return []
    return [
        p.name[: -len(suffix)]
        for p in folder.iterdir()
        if p.name.endswith(suffix) and not p.name.startswith("._")
    ]


def _nnunet_labels(
    labels: Any, ds: Path
) -> tuple[list[tuple[str, int]], dict[str, str], list[str]]:
    """(name, value) pairs of nnU-Net's name -> value labels, with region lists."""
    if not isinstance(labels, dict) or not labels:
        raise SiteDataError(
            f'{ds}: "labels" must map names to values, e.g. {{"background": 0, '
            '"kidney": 1}'
        )
    regions = {n: v if isinstance(v, list) else [v] for n, v in labels.items()}
    for name, values in regions.items():
        if not values or not all(type(v) is int and v >= 0 for v in values):
            raise SiteDataError(
                f"{ds}: label {name!r} is {labels[name]!r}; expected a non-negative "
                "integer"
            )
    if {_norm(n): sorted(v) for n, v in regions.items()} == _KITS_REGIONS:
        names = [(n, _KITS_REGION_VALUES[_norm(n)]) for n in regions]
        note = "nnU-Net KiTS region labels read as KiTS values 0-3 (masses -> cyst)"
        return names, {"masses": "cyst"}, [note]
    names = [(n, v) for n, v in labels.items() if not isinstance(v, list)]
    covered = {v for _, v in names}
    for name, values in regions.items():
        if missing := sorted(set(values) - covered):
            raise SiteDataError(
                f"{ds}: label {name!r} is a region {values} and values {missing} have "
                "no integer label of their own; kidneyfl needs one integer value per "
                "label name (of region labels only the KiTS pattern is known), so "
                "use the dataset's original integer labels"
            )
    return names, {}, []


def _manifest(path: Path) -> _Parsed:
    if not path.is_file():
        raise SiteDataError(
            f"manifest {path} not found; create a CSV with header "
            f"'{MANIFEST_HEADER}' or set data.manifest to its path"
        )
    rows = []
    # utf-8-sig: spreadsheet exports often start with a byte-order mark.
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        cols = [c.strip().lower() for c in next(reader, [])]
        if (
            len(set(cols)) != len(cols)
            or not {"image", "label"} <= set(cols)
            or set(cols) - {"image", "label"} - _MANIFEST_OPTIONAL
        ):
            raise SiteDataError(
                f"{path}: header is {','.join(cols) or '(empty)'!r}; expected "
                f"'{MANIFEST_HEADER}' (one row per case, label empty if none)"
            )
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(cols):
                raise SiteDataError(
                    f"{where}: {len(row)} fields, header has {len(cols)}"
                )
            rec = dict(zip(cols, (c.strip() for c in row), strict=True))
            if not rec["image"]:
                raise SiteDataError(f"{where}: the image path is empty")
            split = rec.get("split", "").lower()
            if split and split not in SPLITS:
                raise SiteDataError(
                    f"{where}: split {rec['split']!r} is not one of "
                    f"{', '.join(SPLITS)} (or empty)"
                )
            label = path.parent / rec["label"] if rec["label"] else None
            patient = rec.get("patient") or None
            rows.append((path.parent / rec["image"], label, split, patient))
    ids = _dedupe([_stem(row[0]) for row in rows])
    cases = [
        Case(cid, img, lab, patient)
        for cid, (img, lab, _, patient) in zip(ids, rows, strict=True)
    ]
    splits = {cid: row[2] for cid, row in zip(ids, rows, strict=True) if row[2]}
    source = f"{path} (its label values are read as kidneyfl's 0-3)"
    notes = [] if cases else [f"{path} lists no cases"]
    return _Parsed(cases, list(KIDNEYFL_LABELS.items()), source, notes, splits)


def _label_map(
    names: list[tuple[str, int]],
    label_names: dict[str, str] | None,
    source: str,
    defaults: dict[str, str],
) -> dict[int, int]:
    overrides = {}
    for key, target in (label_names or {}).items():
        t = _norm(str(target))
        t = "tumour" if t == "tumor" else t
        if t not in KIDNEYFL_LABELS:
            raise SiteDataError(
                f"data.label_names: {key!r} maps to {target!r}; kidneyfl labels "
                f"are {', '.join(KIDNEYFL_LABELS)}"
            )
        overrides[_norm(key)] = t
    if unknown := sorted(set(overrides) - {_norm(n) for n, _ in names}):
        raise SiteDataError(
            f"data.label_names names {unknown}, which {source} does not define "
            f"(its labels: {', '.join(n for n, _ in names)}); fix the spelling"
        )
    table = {**_DEFAULT_NAMES, **defaults, **overrides}
    out: dict[int, int] = {}
    for name, value in names:
        if (target := table.get(_norm(name))) is None:
            raise SiteDataError(
                f"{source}: label {name!r} (value {value}) has no kidneyfl meaning; "
                "add it under data.label_names in the site YAML, e.g. "
                f"label_names: {{{name}: background}} (kidneyfl labels: "
                f"{', '.join(KIDNEYFL_LABELS)})"
            )
        if out.setdefault(value, KIDNEYFL_LABELS[target]) != KIDNEYFL_LABELS[target]:
            raise SiteDataError(
                f"{source}: value {value} gets two kidneyfl labels; fix label_names"
            )
    return out


def _norm(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem


def _dedupe(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for cid in ids:
        new, n = cid, 1
        while new in seen:
            n += 1
            new = f"{cid}_{n}"
        seen.add(new)
        out.append(new)
    return out
