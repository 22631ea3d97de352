"""Classification data at a site: a CSV manifest or one folder per class.

Manifest: ``image,label[,split][,patient]`` with a header; ``image`` relative
to the manifest's folder (or absolute); ``label`` a class name of the plan's
``class-names`` (empty: kept for prediction only); ``split`` ``train``,
``validation`` or ``test`` (test rows are never trained or validated on);
``patient`` the patient's id (a patient's rows are one unit; empty or no column:
each image is its own patient). Folders: ``<root>/<class>/<image>``, each image
its own patient. Images are 2D or 3D NIfTI in HU (a 3D volume gives its middle
axial slice) or 8-bit PNG slices already windowed.

The patient is the unit of privacy: the training set's items are patients, and
each time Poisson sampling draws a patient one of its slices is taken, so
DP-SGD's per-sample clipping bounds one patient's influence however many slices
the patient has. A patient in both training and validation, or identical images
under two patient ids, are refused (:mod:`client.data.patients`).

Every error names the file (and the CSV row) and the fix. Nothing here leaves
the site.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from client.tasks.segmentation.data import SiteDataError
from common.config import Plan, SiteConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_SUFFIXES = (".png",)
SPLITS = {"train": "train", "validation": "validation", "val": "validation"}
SPLITS_ALL = (*SPLITS, "test", "")


@dataclass(frozen=True)
class ClsCase:
    """One patient's image and class index (None: unlabelled)."""

    case_id: str
    image: Path
    label: int | None
    split: str | None  # from the manifest, or None: split by the site YAML
    patient: str | None = None  # the manifest's patient column

    @property
    def patient_id(self) -> str:
        """The patient's id or, when the layout names none, the image's path
        (file names may repeat across class folders; paths do not)."""
        return self.patient or str(self.image)


def _is_image(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and name.endswith(NIFTI_SUFFIXES + PNG_SUFFIXES)


def _case_id(p: Path) -> str:
    name = p.name
    for suffix in (".nii.gz", ".nii", ".png"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_manifest(
    path: Path, class_names: tuple[str, ...] | None = None
) -> list[ClsCase]:
    """Parse a classification manifest.

    ``class_names`` None accepts any class name (the readiness check, which has
    no plan), indexed in sorted order.

    Raises
    ------
    SiteDataError
        Missing or unreadable file, missing columns, a row with the wrong number
        of fields, an unknown class or split, or an image file that is missing.
    """
    if not path.is_file():
        raise SiteDataError(
            f"{path}: manifest not found; write a CSV with header image,label"
            "[,split] or set data.manifest in the site YAML"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteDataError(
            f"{path}: cannot read the manifest ({exc}); save it as UTF-8 CSV"
        ) from None
    rows = list(csv.reader(text.splitlines()))
    if not rows:
        raise SiteDataError(f"{path}: empty manifest; add the header image,label")
    header = [h.strip().lower() for h in rows[0]]
    if "image" not in header or "label" not in header:
        raise SiteDataError(
            f"{path}: row 1: header is {rows[0]}; the first row must name the "
            "columns image,label[,split][,patient]"
        )
    col = {h: i for i, h in enumerate(header)}
    if class_names is None:
        class_names = _labels_in(rows, col["label"])
    cases: list[ClsCase] = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise SiteDataError(
                f"{path}: row {n}: {len(row)} fields but the header has "
                f"{len(header)}; quote file names that contain commas"
            )
        image = Path(row[col["image"]].strip()).expanduser()
        image = image if image.is_absolute() else path.parent / image
        label = row[col["label"]].strip()
        split = row[col["split"]].strip().lower() if "split" in col else ""
        patient = row[col["patient"]].strip() if "patient" in col else ""
        if not image.is_file():
            raise SiteDataError(
                f"{path}: row {n}: image {image} not found; fix the path (relative "
                "paths are read from the manifest's folder) or remove the row"
            )
        if label and label not in class_names:
            raise SiteDataError(
                f"{path}: row {n}: unknown class {label!r}; the plan's class-names "
                f"are {', '.join(class_names)}: correct the row or add the class "
                "to the plan's class-names"
            )
        if split not in SPLITS_ALL:
            raise SiteDataError(
                f"{path}: row {n}: unknown split {split!r}; use train, validation, "
                "test or leave it empty"
            )
        cases.append(
            ClsCase(
                _case_id(image),
                image,
                class_names.index(label) if label else None,
                SPLITS.get(split, "test" if split == "test" else None),
                patient or None,
            )
        )
    if not cases:
        raise SiteDataError(f"{path}: the manifest lists no images; add rows")
    return cases


def _labels_in(rows: list[list[str]], column: int) -> tuple[str, ...]:
    return tuple(
        sorted({r[column].strip() for r in rows[1:] if len(r) > column} - {""})
    )


def class_names_of(site: SiteConfig) -> tuple[str, ...]:
    """The class names a site's data use (manifest labels or class folders),
    sorted: the classes :func:`discover` with ``plan`` None indexes."""
    d = site.data
    manifest = d.manifest or d.root / MANIFEST
    if d.layout == "manifest" or (d.layout == "auto" and manifest.is_file()):
        rows = list(csv.reader(manifest.read_text(encoding="utf-8-sig").splitlines()))
        header = [h.strip().lower() for h in rows[0]] if rows else []
        return _labels_in(rows, header.index("label")) if "label" in header else ()
    return tuple(sorted(p.name for p in d.root.iterdir() if p.is_dir()))


def read_class_folders(
    root: Path, class_names: tuple[str, ...] | None = None
) -> list[ClsCase]:
    """Cases from ``<root>/<class>/<image>`` (``class_names`` None: any folder
    is a class).

    Raises
    ------
    SiteDataError
        A folder that is not a class, a class folder without images, or no
        class folder at all.
    """
    if not root.is_dir():
        raise SiteDataError(f"{root}: data.root is not a folder; fix data.root")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if class_names is None:
        class_names = tuple(p.name for p in folders)
    unknown = [p.name for p in folders if p.name not in class_names]
    if unknown:
        raise SiteDataError(
            f"{root}: folder(s) {unknown} are not classes of the plan "
            f"({', '.join(class_names)}); rename them or add the class to "
            "class-names"
        )
    if not folders:
        raise SiteDataError(
            f"{root}: no class folders; make one folder per class "
            f"({', '.join(class_names)}) or use a manifest.csv"
        )
    cases = []
    for folder in folders:
        images = sorted(p for p in folder.iterdir() if _is_image(p))
        if not images:
            raise SiteDataError(
                f"{folder}: class folder holds no .nii, .nii.gz or .png images; "
                "add images or remove the empty folder"
            )
        label = class_names.index(folder.name)
        cases += [ClsCase(_case_id(p), p, label, None) for p in images]
    return cases


def discover(site: SiteConfig, plan: Plan | None) -> list[ClsCase]:
    """The site's cases, by ``data.layout`` (``auto``: manifest, then folders);
    ``plan`` None accepts any class name (the readiness check)."""
    names = plan.class_names if plan is not None else None
    data = site.data
    manifest = data.manifest or data.root / MANIFEST
    layout = data.layout
    if layout == "auto":
        layout = "manifest" if manifest.is_file() else "class-folders"
    if layout == "manifest":
        return read_manifest(manifest, names)
    if layout == "class-folders":
        return read_class_folders(data.root, names)
    raise SiteDataError(
        f"{site.source}: data.layout {layout} is a segmentation layout; for the "
        "classification task set data.layout to manifest or class-folders"
    )


def split_cases(
    cases: list[ClsCase], site: SiteConfig
) -> tuple[list[ClsCase], list[ClsCase]]:
    """Train and validation cases, labelled only, split by patient.

    See :func:`client.tasks.classification.split.split_patients`.

    Raises
    ------
    SiteDataError
        No labelled training image; a patient in both training and validation,
        an image listed twice, or identical images under two patient ids.
    """
    from client.data.patients import refuse
    from client.tasks.classification.split import split_patients

    train, val, problems = split_patients(cases, site)
    refuse(problems, site.name)
    return train, val


def load_slice(path: Path, plan: Plan) -> torch.Tensor:
    """One image as a (1, S, S) float tensor in [0, 1], S = the plan's image-size.

    NIfTI in HU is clipped to the plan's ``hu-window`` and scaled to [0, 1]; a
    3D volume gives its middle axial slice. PNG is taken as already windowed
    (0-255). The slice is resized (area interpolation) to S x S.

    Raises
    ------
    SiteDataError
        The file cannot be read or is not a 2D slice or 3D volume.
    """
    name = path.name.lower()
    try:
        if name.endswith(PNG_SUFFIXES):
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        else:
            img = nib.load(str(path))
            if img.ndim == 3:
                img = nib.as_closest_canonical(img)
            arr = np.asarray(img.dataobj, dtype=np.float32)
            if arr.ndim == 4 and arr.shape[3] == 1:
                arr = arr[..., 0]
            if arr.ndim == 3:
                arr = arr[:, :, arr.shape[2] // 2]
            lo, hi = plan.hu_window
            arr = (np.clip(arr, lo, hi) - lo) / (hi - lo)
    except SiteDataError:
        raise
    except Exception as exc:  # nibabel and PIL raise many types
        raise SiteDataError(
            f"{path}: cannot read the image ({type(exc).__name__}: {exc}); "
            "replace the file or remove it from the manifest"
        ) from None
    if arr.ndim != 2 or min(arr.shape) < 2 or not np.isfinite(arr).all():
        raise SiteDataError(
            f"{path}: expected a 2D slice or 3D volume with finite values, got "
            f"shape {arr.shape}; replace the file"
        )
    t = torch.from_numpy(np.ascontiguousarray(arr))[None, None]
    size = (plan.image_size, plan.image_size)
    return F.interpolate(t, size=size, mode="area")[0].float()


class SliceDataset(torch.utils.data.Dataset):
    """Preloaded slices grouped by patient; items are patients.

    ``len`` is the number of patients, and item ``i`` is one slice of patient
    ``i`` with its label, drawn at random at each access: Opacus' Poisson
    sampling over the items draws patients, so one patient is one sample for
    DP-SGD's clipping whatever its number of slices. Items are ``(image,
    label)`` tuples, as Opacus needs; ``images`` and ``labels`` keep every
    slice (evaluation reads them all).

    ``augment`` flips slices at random (the class does not depend on side or
    orientation). ``balanced`` redraws, at each :meth:`set_seed`, which slices
    an epoch visits, as many as there are patients, with equal probability per
    class (a weighted sampler that survives ``DataLoader(shuffle=True)``); only
    without DP, since it shows a patient more than once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: bool = False,
        balanced: bool = False,
        patients: list[list[int]] | None = None,
    ) -> None:
        self.images, self.labels = images, labels
        self.augment, self.balanced = augment, balanced
        self.patients = (
            patients if patients is not None else [[j] for j in range(len(labels))]
        )
        self.drawn: list[int] | None = None  # balanced: slice per item
        self._gen = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.drawn is not None:
            j = self.drawn[i]
        else:
            group = self.patients[i]
            j = group[0]
            if len(group) > 1:
                j = group[int(torch.randint(len(group), (1,), generator=self._gen))]
        x = self.images[j]
        if self.augment:
            flips = torch.rand(2, generator=self._gen) < 0.5
            dims = [d + 1 for d in range(2) if flips[d]]
            if dims:
                x = torch.flip(x, dims)
        return x, self.labels[j]

    def set_seed(self, seed: int) -> None:
        """Seed augmentation and the slice drawn per patient and, when
        balanced, redraw the visited slices."""
        self._gen.manual_seed(seed)
        if self.balanced and len(self.labels):
            counts = torch.bincount(self.labels).float()
            w = 1.0 / counts[self.labels]
            g = torch.Generator().manual_seed(seed)
            drawn = torch.multinomial(w, len(self.patients), True, generator=g)
            self.drawn = drawn.tolist()

    def class_counts(self, n_classes: int) -> list[int]:
        """Slices per class (local only; never sent)."""
        return torch.bincount(self.labels, minlength=n_classes).tolist()


def build_dataset(
    cases: list[ClsCase], plan: Plan, augment: bool = False, balanced: bool = False
) -> SliceDataset:
    """Load ``cases`` into a :class:`SliceDataset`, one item per patient."""
    size = plan.image_size
    images = (
        torch.stack([load_slice(c.image, plan) for c in cases])
        if cases
        else torch.zeros((0, 1, size, size))
    )
    labels = torch.tensor([int(c.label or 0) for c in cases], dtype=torch.long)
    groups: dict[str, list[int]] = {}
    for j, c in enumerate(cases):
        groups.setdefault(c.patient_id, []).append(j)
    return SliceDataset(images, labels, augment, balanced, list(groups.values()))


def fingerprint(ds: SliceDataset) -> str:
    """Digest of the training pixels and labels, for the privacy ledger."""
    h = hashlib.sha256()
    h.update(ds.images.numpy().tobytes())
    h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()[:16]
