"""The segmentation pipeline: MONAI transforms, cached volumes, random patches.

Deterministic preprocessing (load, map labels, RAS, resample, window, crop,
normalise) is cached per plan at the site; training draws one
foreground-weighted patch per patient per epoch; evaluation and prediction use
whole volumes. Nothing here leaves the site.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt
from monai.data import PersistentDataset

from client.data.label_map import remap_labels
from client.data.layouts import Case
from common.config import Plan, SiteConfig

IMAGE, LABEL = "image", "label"


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
