"""Dataset layouts (KiTS, MSD, nnU-Net v2, CSV manifest) as one case list.

Discovery only lists files and never opens a NIfTI: it stays fast on thousands
of cases, and a missing or corrupt file is reported by the readiness check
rather than silently dropped here. Each layout also yields a label map from the
dataset's values to kidneyfl's (0 background, 1 kidney, 2 tumour, 3 cyst).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.data.errors import SiteDataError
from client.data.label_map import KIDNEYFL_LABELS, build_label_map, nnunet_labels
from client.data.manifest import MANIFEST, case_ids, dedupe, read_manifest_rows

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "kits19", "kits21", "kits23", "msd", "nnunet", "manifest")
_KITS_NAMES = [("background", 0), ("kidney", 1), ("tumor", 2), ("cyst", 3)]
_IMG, _SEG, _MAJ = "imaging.nii.gz", "segmentation.nii.gz", "aggregated_MAJ_seg.nii.gz"


@dataclass(frozen=True)
class Case:
    """One patient's volume and, for training and validation, its label file.

    ``patient`` comes from a manifest's ``patient`` column; without one the
    case is its own patient.
    """

    case_id: str
    image: Path
    label: Path | None
    patient: str | None = None

    @property
    def patient_id(self) -> str:
        """The patient's id, or the case id when the layout names none."""
        return self.patient or self.case_id


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
        parsed = _manifest(Path(manifest) if manifest else root / MANIFEST)
    elif layout in ("msd", "nnunet"):
        parsed = _msd(root) if layout == "msd" else _nnunet(root)
    else:
        parsed = _kits(root, layout)
    lmap = build_label_map(parsed.names, label_names, parsed.source, parsed.defaults)
    n_labelled = sum(c.label is not None for c in parsed.cases)
    log.info("layout %s: %d cases (%d labelled)", layout, len(parsed.cases), n_labelled)
    return Discovered(layout, parsed.cases, lmap, parsed.notes, parsed.splits)


def _detect(root: Path) -> str:
    _require_dir(root)
    if (root / MANIFEST).is_file():
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
    ids = case_ids([Path(i) for i, _ in entries])
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
    names, defaults, notes = nnunet_labels(meta.get("labels"), ds)
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
        for cid, (img, lab) in zip(dedupe(train + test), entries, strict=True)
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


def _manifest(path: Path) -> _Parsed:
    rows = read_manifest_rows(path)
    ids = case_ids([r.image for r in rows])
    cases = [
        Case(cid, r.image, _label_file(path, r.label), r.patient or None)
        for cid, r in zip(ids, rows, strict=True)
    ]
    splits = {cid: r.split for cid, r in zip(ids, rows, strict=True) if r.split}
    source = f"{path} (its label values are read as kidneyfl's 0-3)"
    notes = [] if cases else [f"{path} lists no cases"]
    return _Parsed(cases, list(KIDNEYFL_LABELS.items()), source, notes, splits)


def _label_file(manifest: Path, cell: str) -> Path | None:
    if not cell:
        return None
    label = Path(cell).expanduser()
    return label if label.is_absolute() else manifest.parent / label
