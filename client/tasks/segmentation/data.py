"""Site data: find cases on disk, split them, and build MONAI pipelines.

Whatever the layout, discovery ends in the same list of :class:`Case`, so the
training code never knows how a hospital stores its files. Nothing here leaves
the site: file names and paths stay in local logs only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import nibabel as nib
import numpy as np
import torch
from monai import transforms as mt
from monai.data import PersistentDataset

from client.data.case_check import CaseReport, inspect_case
from common.config import Plan, SiteConfig

if TYPE_CHECKING:
    from client.data.patients import PatientProblem

log = logging.getLogger(__name__)

IMAGE, LABEL = "image", "label"


class SiteDataError(RuntimeError):
    """The site's data cannot be used for training; the message says why."""


@dataclass(frozen=True)
class Case:
    """One patient: an image and, for training and validation, its label.

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
class SiteCases:
    """A site's usable cases, split, plus what was skipped and why (local only)."""

    train: list[Case]
    validation: list[Case]
    skipped: dict[str, str]
    label_map: dict[int, int] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Stable digest of the training set (ids and file sizes), for the ledger."""
        h = hashlib.sha256()
        for c in sorted(self.train, key=lambda c: c.case_id):
            h.update(c.case_id.encode())
            h.update(str(c.image.stat().st_size).encode())
        return h.hexdigest()[:16]


_INSPECTED: dict[tuple, CaseReport] = {}


def inspect(
    case: Case, label_values: frozenset[int] = frozenset({0, 1, 2, 3})
) -> CaseReport:
    """:func:`client.data.case_check.inspect_case`, memoised per file version, so a
    long-lived process (a simulation actor) reads each case once."""
    key = (label_values,) + tuple(
        (str(p), p.stat().st_mtime_ns, p.stat().st_size) if p.exists() else (str(p),)
        for p in (case.image, case.label)
        if p is not None
    )
    if key not in _INSPECTED:
        _INSPECTED[key] = inspect_case(case.image, case.label, label_values)
    return _INSPECTED[key]


def load_site_cases(site: SiteConfig) -> SiteCases:
    """Discover (any supported layout), validate and split a site's cases.

    Cases listed in ``data.exclude_cases`` are left out; unreadable cases are
    logged by path and skipped; unlabelled cases are kept for prediction only.
    Each case must be a distinct patient (:mod:`client.data.patients`).

    Raises
    ------
    SiteDataError
        If no labelled case is usable, or too few to split; if a patient is
        listed twice (repeated file, identical images, repeated patient id) or
        is in both training and validation.
    """
    from client.data.layouts import discover
    from client.data.patients import refuse

    d = site.data
    found = discover(d.root, d.layout, d.label_names, d.manifest)
    skipped: dict[str, str] = {}
    usable = []
    for case in leave_out(found.cases, d.exclude_cases, skipped):
        if case.label is None:
            skipped[case.case_id] = "no segmentation (prediction only)"
            continue
        report = inspect(case, frozenset(found.label_map))
        if report.usable:
            usable.append(case)
            continue
        first = next(f for f in report.findings if f.severity == "error")
        problem = f"{first.file}: {first.message}; {first.fix}"
        log.warning("skipping case %s: %s", case.case_id, problem)
        skipped[case.case_id] = problem
    if len(usable) < 2:
        raise SiteDataError(
            f"site {site.name}: {len(usable)} usable labelled case(s) under "
            f"{d.root} ({len(found.cases)} found, {len(skipped)} skipped); at least "
            "2 are needed. Run `kidneyfl site check` for the list of problems"
        )
    train, val = split_site_cases(usable, site, found.splits)
    refuse(patient_problems(train, val, frozenset(found.label_map)), site.name)
    return SiteCases(train, val, skipped, found.label_map)


class _OfPatient(Protocol):
    @property
    def case_id(self) -> str: ...

    @property
    def patient_id(self) -> str: ...


_C = TypeVar("_C", bound=_OfPatient)


def leave_out(
    cases: list[_C], exclude: list[str] | None, skipped: dict[str, str]
) -> list[_C]:
    """``cases`` less those whose case or patient id ``data.exclude_cases``
    lists; the left out are added to ``skipped``.

    Raises
    ------
    SiteDataError
        If ``exclude`` names an id that is no case or patient of the site.
    """
    names = set(exclude or [])
    known = {c.case_id for c in cases} | {c.patient_id for c in cases}
    if unknown := sorted(names - known):
        raise SiteDataError(
            f"data.exclude_cases names {unknown}, which are neither cases nor "
            "patients of this site; fix the spelling or remove them"
        )
    kept = []
    for c in cases:
        if c.case_id in names or c.patient_id in names:
            skipped[c.case_id] = "left out by data.exclude_cases"
        else:
            kept.append(c)
    return kept


def patient_problems(
    train: list[Case], validation: list[Case], label_values: frozenset[int]
) -> list[PatientProblem]:
    """What breaks one-case-per-patient in a split (:mod:`client.data.patients`);
    the images' digests come from the (memoised) inspection."""
    from client.data.patients import Unit
    from client.data.patients import patient_problems as problems

    units = [
        Unit(c.case_id, c.patient_id, c.image, inspect(c, label_values).image_digest, s)
        for s, group in (("train", train), ("validation", validation))
        for c in group
    ]
    return problems(units, one_case_per_patient=True)


def split_site_cases(
    cases: list[Case], site: SiteConfig, splits: dict[str, str] | None = None
) -> tuple[list[Case], list[Case]]:
    """Training and validation cases: the manifest's split column, else
    ``data.train_cases`` / ``data.validation_cases``, else a seeded random split
    by ``data.validation_fraction``.

    Raises
    ------
    SiteDataError
        If the YAML names cases that are not usable.
    """
    by_id = {c.case_id: c for c in cases}
    d = site.data
    if splits and d.train_cases is None and d.validation_cases is None:
        val = [c for c in cases if splits.get(c.case_id) == "validation"]
        train = [c for c in cases if splits.get(c.case_id) in (None, "", "train")]
        if val and train:
            return train, val
    if d.train_cases is not None or d.validation_cases is not None:
        named = (d.train_cases or []) + (d.validation_cases or [])
        missing = [i for i in named if i not in by_id]
        if missing:
            raise SiteDataError(
                f"site {site.name}: cases {missing} named in the site YAML are not "
                "usable; fix data.train_cases / data.validation_cases"
            )
        train = [by_id[i] for i in d.train_cases or [] if i in by_id]
        val = [by_id[i] for i in d.validation_cases or []]
        if d.train_cases is None:
            train = [c for c in cases if c.case_id not in set(d.validation_cases or [])]
        return train, val
    order = sorted(by_id)
    random.Random(d.split_seed).shuffle(order)
    n_val = (
        max(1, round(len(order) * d.validation_fraction))
        if d.validation_fraction
        else 0
    )
    n_val = min(n_val, len(order) - 1)
    val_ids = set(order[:n_val])
    return (
        [c for c in cases if c.case_id not in val_ids],
        [c for c in cases if c.case_id in val_ids],
    )


def raw_volumes(cases: list[Case], label_map: dict[int, int] | None = None):
    """``(image HU, label, spacing)`` per case in RAS axis order, labels in
    kidneyfl's values, for the dataset fingerprint (aggregated at the site)."""
    from client.data.layouts import remap_labels

    for case in cases:
        img = nib.as_closest_canonical(nib.load(str(case.image)))
        lab = nib.as_closest_canonical(nib.load(str(case.label)))
        yield (
            np.asanyarray(img.dataobj, dtype=np.float32),
            remap_labels(np.asanyarray(lab.dataobj), label_map)
            if label_map
            else np.asanyarray(lab.dataobj),
            tuple(float(z) for z in img.header.get_zooms()[:3]),
        )


def preprocessing(plan: Plan, label_map: dict[int, int] | None = None) -> mt.Compose:
    """Deterministic transforms: load, map labels to kidneyfl's, RAS, resample,
    window and normalise."""
    lo, hi = plan.hu_window
    remap = []
    if label_map and any(k != v for k, v in label_map.items()):
        remap = [mt.Lambdad(keys=[LABEL], func=lambda x: _remapped(x, label_map))]
    return mt.Compose(
        [
            mt.LoadImaged(keys=[IMAGE, LABEL], image_only=True, reader="NibabelReader"),
            *remap,
            mt.EnsureChannelFirstd(keys=[IMAGE, LABEL]),
            mt.Orientationd(keys=[IMAGE, LABEL], axcodes="RAS"),
            mt.Spacingd(
                keys=[IMAGE, LABEL],
                pixdim=plan.spacing_mm,
                mode=("bilinear", "nearest"),
            ),
            *window_crop_normalise(plan),
            mt.EnsureTyped(keys=[IMAGE], dtype=torch.float32, track_meta=False),
            mt.EnsureTyped(keys=[LABEL], dtype=torch.uint8, track_meta=False),
        ]
    )


def window_crop_normalise(plan: Plan, keys: tuple[str, ...] = (IMAGE, LABEL)) -> list:
    """The plan's intensity steps: window, crop to the body, normalise (shared by
    training, evaluation and prediction, which passes ``keys=(IMAGE,)``)."""
    # Crop to voxels above the window's floor in both schemes, before any
    # z-scoring (below-mean tissue would otherwise look like background).
    lo, hi = plan.hu_window
    crop = mt.CropForegroundd(
        keys=list(keys), source_key=IMAGE, margin=2, select_fn=lambda x: x > 0
    )
    if plan.intensity_mean is None or plan.intensity_std is None:
        scale = mt.ScaleIntensityRanged(
            keys=[IMAGE], a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True
        )
        return [scale, crop]
    # nnU-Net's CT scheme: clip to the pooled window, z-score with pooled stats
    clip = mt.ScaleIntensityRanged(
        keys=[IMAGE], a_min=lo, a_max=hi, b_min=lo, b_max=hi, clip=True
    )
    crop_hu = mt.CropForegroundd(
        keys=list(keys), source_key=IMAGE, margin=2, select_fn=lambda x: x > lo
    )
    zscore = mt.NormalizeIntensityd(
        keys=[IMAGE], subtrahend=plan.intensity_mean, divisor=plan.intensity_std
    )
    return [clip, crop_hu, zscore]


def _remapped(x: torch.Tensor, label_map: dict[int, int]) -> torch.Tensor:
    from client.data.layouts import remap_labels

    out = x.clone()  # in place on a copy keeps the MetaTensor's affine
    out[...] = torch.as_tensor(remap_labels(np.asarray(x), label_map), dtype=out.dtype)
    return out


def _cache_dir(
    site: SiteConfig, plan: Plan, label_map: dict[int, int] | None = None
) -> Path:
    # Preprocessed volumes are cached at the site; a new plan gets a new cache.
    lm = sorted((label_map or {}).items())
    norm = [plan.intensity_mean, plan.intensity_std]
    key = json.dumps([plan.spacing_mm, plan.hu_window, norm, lm, "v1"]).encode()
    return site.state_dir / "cache" / hashlib.sha256(key).hexdigest()[:12]


class MemoVolumes(torch.utils.data.Dataset):
    """Preprocessed volumes: on site disk (MONAI PersistentDataset) and, up to a
    memory budget, in this process, which in simulation serves every round."""

    _memo: dict[tuple[str, str], dict] = {}
    _bytes = 0
    budget_bytes = 4 * 2**30

    def __init__(
        self,
        items: list[dict],
        plan: Plan,
        cache: Path,
        label_map: dict[int, int] | None = None,
    ) -> None:
        self.items = items
        self.cache = str(cache)
        self.disk = PersistentDataset(
            items, transform=preprocessing(plan, label_map), cache_dir=cache
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        key = (self.cache, self.items[index][IMAGE])
        hit = MemoVolumes._memo.get(key)
        if hit is not None:
            return dict(hit)
        item = self.disk[index]
        size = sum(
            v.numel() * v.element_size()
            for v in item.values()
            if isinstance(v, torch.Tensor)
        )
        if MemoVolumes._bytes + size <= MemoVolumes.budget_bytes:
            MemoVolumes._memo[key] = item
            MemoVolumes._bytes += size
        return dict(item)


def volume_dataset(
    cases: list[Case],
    site: SiteConfig,
    plan: Plan,
    label_map: dict[int, int] | None = None,
) -> MemoVolumes:
    """Whole preprocessed volumes (dicts of image, label), cached at the site."""
    cache = _cache_dir(site, plan, label_map)
    cache.mkdir(parents=True, exist_ok=True)
    items = [{IMAGE: str(c.image), LABEL: str(c.label)} for c in cases]
    return MemoVolumes(items, plan, cache, label_map)


class PatchDataset(torch.utils.data.Dataset):
    """One foreground-weighted random patch per case per epoch.

    One item per patient keeps DP-SGD's unit of privacy the patient. Items are
    plain ``(image, label)`` tuples: Opacus builds empty Poisson batches from the
    first sample's structure, which fails for MONAI's dictionaries.
    """

    def __init__(self, volumes: torch.utils.data.Dataset, plan: Plan) -> None:
        self.volumes = volumes
        keys = [IMAGE, LABEL]
        if plan.patch_sampling == "label-classes":
            # centred on background, kidney, tumour and cyst by the plan's
            # ratios: small tumours and cysts are seen far more often than a
            # foreground/background crop would show them (issue 19)
            crop = mt.RandCropByLabelClassesd(
                keys=keys,
                label_key=LABEL,
                spatial_size=plan.patch_size,
                ratios=list(plan.patch_class_ratios),
                num_classes=len(plan.patch_class_ratios),
                num_samples=1,
                warn=False,  # a case without a cyst is normal
            )
        else:
            crop = mt.RandCropByPosNegLabeld(
                keys=keys,
                label_key=LABEL,
                spatial_size=plan.patch_size,
                pos=2.0,
                neg=1.0,
                num_samples=1,
            )
        augment = []
        if plan.augmentation:
            augment = [
                *(mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=a) for a in range(3)),
                mt.RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=0.5),
                mt.RandShiftIntensityd(keys=IMAGE, offsets=0.1, prob=0.5),
            ]
        self.crop = mt.Compose(
            [mt.SpatialPadd(keys=keys, spatial_size=plan.patch_size), crop, *augment]
        )

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.crop(self.volumes[index])[0]
        return (
            torch.as_tensor(item[IMAGE], dtype=torch.float32),
            torch.as_tensor(item[LABEL], dtype=torch.long),
        )

    def set_seed(self, seed: int) -> None:
        """Seed the random crops (deterministic per site and round)."""
        self.crop.set_random_state(seed=seed)
