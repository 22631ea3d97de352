"""Classification data at a site: a CSV manifest or one folder per class.

Manifest: ``image,label[,split]`` with a header; ``image`` relative to the
manifest's folder (or absolute); ``label`` a class name of the plan's
``class-names`` (empty: kept for prediction only); ``split`` ``train``,
``validation`` or ``test`` (test rows are never trained or validated on).
Folders: ``<root>/<class>/<image>``. Images are 2D or 3D NIfTI in HU (a 3D
volume gives its middle axial slice) or 8-bit PNG slices already windowed.

Every error names the file (and the CSV row) and the fix. Nothing here leaves
the site.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from client.data import SiteDataError
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


def _is_image(p: Path) -> bool:
    name = p.name.lower()
    return p.is_file() and name.endswith(NIFTI_SUFFIXES + PNG_SUFFIXES)


def _case_id(p: Path) -> str:
    name = p.name
    for suffix in (".nii.gz", ".nii", ".png"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_manifest(path: Path, class_names: tuple[str, ...]) -> list[ClsCase]:
    """Parse a classification manifest.

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
            "columns image,label[,split]"
        )
    col = {h: i for i, h in enumerate(header)}
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
            )
        )
    if not cases:
        raise SiteDataError(f"{path}: the manifest lists no images; add rows")
    return cases


def read_class_folders(root: Path, class_names: tuple[str, ...]) -> list[ClsCase]:
    """Cases from ``<root>/<class>/<image>``.

    Raises
    ------
    SiteDataError
        A folder that is not a class, a class folder without images, or no
        class folder at all.
    """
    if not root.is_dir():
        raise SiteDataError(f"{root}: data.root is not a folder; fix data.root")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
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


def discover(site: SiteConfig, plan: Plan) -> list[ClsCase]:
    """The site's cases, by ``data.layout`` (``auto``: manifest, then folders)."""
    data = site.data
    manifest = data.manifest or data.root / MANIFEST
    layout = data.layout
    if layout == "auto":
        layout = "manifest" if manifest.is_file() else "class-folders"
    if layout == "manifest":
        return read_manifest(manifest, plan.class_names)
    if layout == "class-folders":
        return read_class_folders(data.root, plan.class_names)
    raise SiteDataError(
        f"{site.source}: data.layout {layout} is a segmentation layout; for the "
        "classification task set data.layout to manifest or class-folders"
    )


def split_cases(
    cases: list[ClsCase], site: SiteConfig
) -> tuple[list[ClsCase], list[ClsCase]]:
    """Train and validation cases, labelled only.

    The manifest's split column wins; then ``data.train_cases`` /
    ``data.validation_cases`` (image names without extension); the rest are
    split per class by ``data.validation_fraction`` with ``data.split_seed``, so
    every class with two or more cases has one in validation.
    """
    d = site.data
    train, val, rest = [], [], []
    for c in cases:
        if c.label is None or c.split == "test":
            continue
        if c.split == "train" or (d.train_cases and c.case_id in d.train_cases):
            train.append(c)
        elif c.split == "validation" or (
            d.validation_cases and c.case_id in d.validation_cases
        ):
            val.append(c)
        else:
            rest.append(c)
    rng = random.Random(d.split_seed)
    for label in sorted({c.label for c in rest if c.label is not None}):
        group = sorted((c for c in rest if c.label == label), key=lambda c: c.case_id)
        rng.shuffle(group)
        k = round(len(group) * d.validation_fraction)
        if d.validation_fraction > 0 and len(group) >= 2:
            k = min(max(k, 1), len(group) - 1)
        val += group[:k]
        train += group[k:]
    if not train:
        raise SiteDataError(
            f"{site.source}: no labelled training images; label some cases or "
            "lower data.validation_fraction"
        )
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
    """Preloaded slices and labels; ``(image, label)`` tuples, as Opacus needs.

    ``augment`` flips slices at random (the class does not depend on side or
    orientation). ``balanced`` redraws, at each :meth:`set_seed`, which cases
    the epoch visits, with equal probability per class (a weighted sampler
    that survives ``DataLoader(shuffle=True)``); only without DP, since it
    shows a patient more than once.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        augment: bool = False,
        balanced: bool = False,
    ) -> None:
        self.images, self.labels = images, labels
        self.augment, self.balanced = augment, balanced
        self.index = list(range(len(labels)))
        self._gen = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = self.index[i]
        x = self.images[j]
        if self.augment:
            flips = torch.rand(2, generator=self._gen) < 0.5
            dims = [d + 1 for d in range(2) if flips[d]]
            if dims:
                x = torch.flip(x, dims)
        return x, self.labels[j]

    def set_seed(self, seed: int) -> None:
        """Seed augmentation and, when balanced, redraw the visited cases."""
        self._gen.manual_seed(seed)
        if self.balanced and len(self.labels):
            counts = torch.bincount(self.labels).float()
            w = 1.0 / counts[self.labels]
            g = torch.Generator().manual_seed(seed)
            drawn = torch.multinomial(w, len(self.labels), True, generator=g)
            self.index = drawn.tolist()

    def class_counts(self, n_classes: int) -> list[int]:
        """Cases per class (local only; never sent)."""
        return torch.bincount(self.labels, minlength=n_classes).tolist()


def build_dataset(
    cases: list[ClsCase], plan: Plan, augment: bool = False, balanced: bool = False
) -> SliceDataset:
    """Load ``cases`` into a :class:`SliceDataset`."""
    size = plan.image_size
    images = (
        torch.stack([load_slice(c.image, plan) for c in cases])
        if cases
        else torch.zeros((0, 1, size, size))
    )
    labels = torch.tensor([int(c.label or 0) for c in cases], dtype=torch.long)
    return SliceDataset(images, labels, augment=augment, balanced=balanced)


def fingerprint(ds: SliceDataset) -> str:
    """Digest of the training pixels and labels, for the privacy ledger."""
    h = hashlib.sha256()
    h.update(ds.images.numpy().tobytes())
    h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()[:16]
