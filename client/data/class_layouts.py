"""Classification layouts: a CSV manifest or one folder per class, as cases.

Manifest (:mod:`client.data.manifest`): ``label`` is a class name of the plan's
``class-names`` (empty: kept for prediction only). Folders:
``<root>/<class>/<image>``, each image its own patient. Images are 2D or 3D
NIfTI in HU or 8-bit PNG slices. Discovery lists files and checks that they
exist; reading them is the task's (:mod:`client.tasks.classification.data`).
Every error names the file (and the row) and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.data.errors import SiteDataError
from client.data.manifest import (
    MANIFEST,
    case_ids,
    manifest_labels,
    read_manifest_rows,
)
from common.config import Plan, SiteConfig

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_SUFFIXES = (".png",)
CLASS_LAYOUTS = ("auto", "manifest", "class-folders")


@dataclass(frozen=True)
class ClsCase:
    """One image and its class index (None: unlabelled)."""

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


def discover_classes(site: SiteConfig, plan: Plan | None) -> list[ClsCase]:
    """The site's cases, by ``data.layout`` (``auto``: manifest, then folders);
    ``plan`` None accepts any class name (the readiness check, which has no
    plan, indexes the classes in sorted order).

    Raises
    ------
    SiteDataError
        A segmentation layout or key, or a manifest or folder problem.
    """
    _refuse_segmentation_keys(site)
    names = plan.class_names if plan is not None else None
    if class_layout(site) == "manifest":
        return read_manifest(manifest_path(site), names)
    return read_class_folders(site.data.root, names)


def class_layout(site: SiteConfig) -> str:
    """``manifest`` or ``class-folders`` (``auto``: a manifest if there is one)."""
    d = site.data
    if d.layout == "auto":
        return "manifest" if manifest_path(site).is_file() else "class-folders"
    return d.layout


def manifest_path(site: SiteConfig) -> Path:
    """``data.manifest``, or ``manifest.csv`` in ``data.root``."""
    return site.data.manifest or site.data.root / MANIFEST


def _refuse_segmentation_keys(site: SiteConfig) -> None:
    d = site.data
    if d.layout not in CLASS_LAYOUTS:
        raise SiteDataError(
            f"{site.source}: data.layout {d.layout} is a segmentation layout; for "
            "the classification task set data.layout to manifest or class-folders"
        )
    if d.manifest is not None and d.layout == "class-folders":
        raise SiteDataError(
            f"{site.source}: data.manifest is set but data.layout is class-folders; "
            "set data.layout to manifest (or auto), or remove data.manifest"
        )
    if d.label_names:
        raise SiteDataError(
            f"{site.source}: data.label_names maps segmentation label values and "
            "means nothing to the classification task (its classes are the plan's "
            "class-names); remove data.label_names"
        )


def read_manifest(
    path: Path, class_names: tuple[str, ...] | None = None
) -> list[ClsCase]:
    """Parse a classification manifest (``class_names`` None: any class name,
    indexed in sorted order).

    Raises
    ------
    SiteDataError
        The manifest's own errors (:mod:`client.data.manifest`), an unknown
        class, an image file that is missing, or no row at all.
    """
    rows = read_manifest_rows(path)
    if class_names is None:
        class_names = manifest_labels(path)
    for r in rows:
        if not r.image.is_file():
            raise SiteDataError(
                f"{r.where(path)}: image {r.image} not found; fix the path "
                "(relative paths are read from the manifest's folder) or remove "
                "the row"
            )
        if r.label and r.label not in class_names:
            raise SiteDataError(
                f"{r.where(path)}: unknown class {r.label!r}; the plan's "
                f"class-names are {', '.join(class_names)}: correct the row or add "
                "the class to the plan's class-names"
            )
    if not rows:
        raise SiteDataError(f"{path}: the manifest lists no images; add rows")
    ids = case_ids([r.image for r in rows])
    return [
        ClsCase(
            cid,
            r.image,
            class_names.index(r.label) if r.label else None,
            r.split or None,
            r.patient or None,
        )
        for cid, r in zip(ids, rows, strict=True)
    ]


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
    if unknown := [p.name for p in folders if p.name not in class_names]:
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
    images, labels = [], []
    for folder in folders:
        found = sorted(p for p in folder.iterdir() if _is_image(p))
        if not found:
            raise SiteDataError(
                f"{folder}: class folder holds no .nii, .nii.gz or .png images; "
                "add images or remove the empty folder"
            )
        images += found
        labels += [class_names.index(folder.name)] * len(found)
    ids = case_ids(images)
    return [
        ClsCase(cid, p, label, None)
        for cid, p, label in zip(ids, images, labels, strict=True)
    ]


def class_names_of(site: SiteConfig) -> tuple[str, ...]:
    """The class names a site's data use (manifest labels or class folders),
    sorted: the classes :func:`discover_classes` with ``plan`` None indexes."""
    if class_layout(site) == "manifest":
        return manifest_labels(manifest_path(site))
    return tuple(sorted(p.name for p in site.data.root.iterdir() if p.is_dir()))


def is_classification(site: SiteConfig) -> bool:
    """Whether the site's data are classification slices: class folders, a
    classification phantom, or a manifest whose labels are not image files."""
    d = site.data
    if d.layout == "class-folders" or (
        site.phantom and site.phantom.task == "classification"
    ):
        return True
    manifest = manifest_path(site)
    if d.layout not in ("auto", "manifest") or not manifest.is_file():
        return False
    try:
        rows = read_manifest_rows(manifest)
    except SiteDataError:
        return False  # the segmentation reader names the problem
    labels = [r.label.lower() for r in rows if r.label]
    return bool(labels) and not any(v.endswith(NIFTI_SUFFIXES) for v in labels)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.name.lower().endswith(NIFTI_SUFFIXES + PNG_SUFFIXES)
