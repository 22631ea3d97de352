"""The segmentation pipeline: MONAI transforms, cached volumes, random patches.

Deterministic preprocessing (load, map labels, RAS, resample, window, crop,
normalise) is cached per plan at the site; training draws one
foreground-weighted patch per patient per epoch; evaluation and prediction use
whole volumes. Nothing here leaves the site.

The intensity steps follow the scans' modality (issue 29, docs/mr.md): CT is
windowed in HU and normalised with the plan's numbers; MR has no units to
window, so each scan is normalised within its own body
(:class:`MRBodyNormalised`). A site whose ``data.modality`` is not the plan's
is refused (:func:`require_modality`).

Each patient's randomness is its own (issue 27): a training patch's crop and
augmentation are seeded from the round's seed, the case's id (hashed) and how
often the case has been drawn this round, never from a stream shared with the
other patients (:mod:`client.tasks.draws`). Which other patients a round
samples, in what order, and their labels leave a patient's patches unchanged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt
from monai.data import PersistentDataset
from scipy import ndimage

from client.data.label_map import remap_labels
from client.data.layouts import Case
from client.request_refused import RequestRefused
from client.tasks.draws import PatientDraws
from common.config import Plan, SiteConfig

IMAGE, LABEL = "image", "label"
# MR's body: voxels above the robust threshold of FSL's BET, p2 + 10% of the
# p2-p98 range, in the image smoothed over 3x3x3 voxels (so that background
# noise stays below it); the largest connected part, its holes filled slice by
# slice (dark tissue inside the body: kidneys in a fat image, flow voids).
BODY_RANGE_SHARE = 0.1
MR_CLIP_PERCENTILES = (0.5, 99.5)
MR_CACHE_VERSION = "mr-v1"  # bump when the MR steps change


def require_modality(site: SiteConfig, plan: Plan) -> str:
    """The modality whose preprocessing this site's scans get under ``plan``.

    Raises
    ------
    RequestRefused
        ``request-invalid`` when the plan is for another modality (and not
        ``mixed``): the coordinator asked for what this site does not hold,
        a value of the request the site cannot act on, so nothing is spent,
        trained or released. Not ``config-invalid``: the site's YAML is right,
        and its operator has nothing to fix.
    """
    if plan.modality not in ("mixed", site.data.modality):
        raise RequestRefused(
            "request-invalid",
            f"site {site.name}: the plan is for {plan.modality} scans and this "
            f"site's data.modality is {site.data.modality}; a model trained on "
            f"one modality does not learn from the other. The coordinator must "
            f'run a {site.data.modality} plan (or modality = "mixed") for '
            "this site to take part",
        )
    return site.data.modality


def preprocessing(
    plan: Plan, label_map: dict[int, int] | None = None, modality: str | None = None
) -> mt.Compose:
    """Deterministic transforms: load, map labels to kidneyfl's, RAS, resample,
    window and normalise (``modality``: the scans', for a ``mixed`` plan)."""
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
            *window_crop_normalise(plan, modality=modality),
            mt.EnsureTyped(keys=[IMAGE], dtype=torch.float32, track_meta=False),
            mt.EnsureTyped(keys=[LABEL], dtype=torch.uint8, track_meta=False),
        ]
    )


def window_crop_normalise(
    plan: Plan, keys: tuple[str, ...] = (IMAGE, LABEL), modality: str | None = None
) -> list:
    """The plan's intensity steps: window, crop to the body, normalise (shared by
    training, evaluation and prediction, which passes ``keys=(IMAGE,)``).

    Parameters
    ----------
    plan : Plan
        Its ``modality`` picks the steps: CT (HU window, the plan's mean and
        standard deviation) or MR (:func:`mr_crop_normalise`).
    keys : tuple of str
        What the crop applies to.
    modality : str, optional
        ``CT`` or ``MR``: the scans' own, which a ``mixed`` plan needs (the
        site's ``data.modality``); default the plan's.

    Raises
    ------
    ValueError
        For a ``mixed`` plan without the scans' modality.
    """
    scans = modality or plan.modality
    if scans == "MR":
        return mr_crop_normalise(keys)
    if scans != "CT":
        raise ValueError(
            "a mixed CT and MR plan preprocesses each scan by its own modality: "
            "pass modality='CT' or 'MR' (a site's data.modality); kidneyfl "
            "predict cannot choose it for a mixed model yet (docs/mr.md)"
        )
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


def mr_crop_normalise(keys: tuple[str, ...] = (IMAGE, LABEL)) -> list:
    """MR's intensity steps: crop to the body, then normalise within it.

    No window (MR has no absolute units) and none of the plan's pooled
    numbers: each scan is clipped to its own body's 0.5-99.5 percentiles and
    z-scored with its body's mean and standard deviation
    (:class:`MRBodyNormalised`); the crop keeps the body (:func:`body_mask`)
    and a margin of 2 voxels, as CT's does.
    """
    crop = mt.CropForegroundd(
        keys=list(keys), source_key=IMAGE, margin=2, select_fn=body_mask
    )
    return [crop, MRBodyNormalised(keys=[IMAGE])]


def body_mask(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The body of an MR image ``(channels, x, y, z)``, RAS axes (z: slices).

    Otsu's threshold was not used: in a tight field of view it splits bright
    tissue from dark tissue rather than the body from air (on the real test
    scan it left every kidney voxel out); MONAI's ``ForegroundMask`` would
    need scikit-image (not a dependency) for it anyway.
    """
    arr = np.asarray(
        image.detach().cpu() if isinstance(image, torch.Tensor) else image,
        dtype=np.float32,
    )
    smooth = ndimage.uniform_filter(arr, size=(1, 3, 3, 3))
    p2, p98 = (float(v) for v in np.percentile(smooth, (2, 98)))
    mask = smooth > p2 + BODY_RANGE_SHARE * (p98 - p2)
    parts, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(parts.ravel())
        sizes[0] = 0
        mask = parts == sizes.argmax()
    for c in range(mask.shape[0]):
        for k in range(mask.shape[-1]):
            mask[c, ..., k] = ndimage.binary_fill_holes(mask[c, ..., k])
    return torch.from_numpy(mask)


class MRBodyNormalised(mt.MapTransform):
    """Clip an MR image to its body's 0.5-99.5 percentiles, then z-score it with
    the clipped body's mean and standard deviation (per scan, per channel).

    MR intensities have no units: the same tissue differs between scanners,
    sequences and even scans, so no window or pooled mean applies (nnU-Net
    z-scores each MR image for the same reason). The statistics are the
    body's (:func:`body_mask`): MONAI's ``ScaleIntensityRangePercentiles``
    takes percentiles over every voxel, air included, and
    ``NormalizeIntensity(nonzero=True)`` counts the background as body, since
    a magnitude image's background is noise, never exactly 0. Outside the
    body the image ends at the clip floor, so air is one constant.

    Bias-field correction is not done. The reference method is N4 (Tustison
    et al., 2010) in ITK, which SimpleITK (``N4BiasFieldCorrectionImageFilter``)
    and ANTsPy (``n4_bias_field_correction``) wrap and maintain, and which does
    it well; neither is a kidneyfl dependency and none is added. MONAI has no
    correction (``RandBiasField`` only simulates a field, to augment). A site
    that needs it runs N4 on its scans before kidneyfl reads them; the
    per-scan z-score removes a global gain, not a field that varies across
    the body.
    """

    def __call__(self, data: dict) -> dict:
        """Normalise each key's image (a dict copy; other keys untouched)."""
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._normalised(d[key])
        return d

    @staticmethod
    def _normalised(img: torch.Tensor) -> torch.Tensor:
        mask = body_mask(img).numpy()
        arr = np.asarray(img.detach().cpu(), dtype=np.float32)
        out = img.clone()
        for c in range(arr.shape[0]):
            body = arr[c][mask[c]] if mask[c].any() else arr[c].ravel()
            lo, hi = (float(v) for v in np.percentile(body, MR_CLIP_PERCENTILES))
            clipped = np.clip(body, lo, hi)
            mean, std = float(clipped.mean()), float(clipped.std())
            out[c] = (out[c].clamp(lo, hi) - mean) / max(std, 1e-6)
        return out


def _remapped(x: torch.Tensor, label_map: dict[int, int]) -> torch.Tensor:
    out = x.clone()  # in place on a copy keeps the MetaTensor's affine
    out[...] = torch.as_tensor(remap_labels(np.asarray(x), label_map), dtype=out.dtype)
    return out


def _cache_dir(
    site: SiteConfig,
    plan: Plan,
    label_map: dict[int, int] | None = None,
    modality: str = "CT",
) -> Path:
    # Preprocessed volumes are cached at the site; a new plan gets a new cache.
    lm = sorted((label_map or {}).items())
    if modality == "MR":  # no window, no pooled numbers: per-scan normalisation
        key = json.dumps([plan.spacing_mm, "MR", lm, MR_CACHE_VERSION]).encode()
    else:  # CT's key as it always was, so existing caches stay valid
        norm = [plan.intensity_mean, plan.intensity_std]
        key = json.dumps([plan.spacing_mm, plan.hu_window, norm, lm, "v1"]).encode()
    return site.state_dir / "cache" / hashlib.sha256(key).hexdigest()[:12]


class MemoVolumes(torch.utils.data.Dataset):
    """Preprocessed volumes: on site disk (MONAI PersistentDataset) and, up to a
    memory budget, in this process, which in simulation serves every round.

    ``case_ids`` names each volume's case (default: its image path): the
    stable key that seeds the case's training patches (:class:`PatchDataset`).
    """

    _memo: dict[tuple[str, str], dict] = {}
    _bytes = 0
    budget_bytes = 4 * 2**30

    def __init__(
        self,
        items: list[dict],
        plan: Plan,
        cache: Path,
        label_map: dict[int, int] | None = None,
        case_ids: list[str] | None = None,
        modality: str | None = None,
    ) -> None:
        self.items = items
        self.case_ids = case_ids or [str(item[IMAGE]) for item in items]
        self.cache = str(cache)
        self.disk = PersistentDataset(
            items, transform=preprocessing(plan, label_map, modality), cache_dir=cache
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
    """Whole preprocessed volumes (dicts of image, label), cached at the site.

    Raises
    ------
    RequestRefused
        If the site's ``data.modality`` is not the plan's
        (:func:`require_modality`).
    """
    modality = require_modality(site, plan)
    cache = _cache_dir(site, plan, label_map, modality)
    cache.mkdir(parents=True, exist_ok=True)
    items = [{IMAGE: str(c.image), LABEL: str(c.label)} for c in cases]
    ids = [c.case_id for c in cases]
    return MemoVolumes(items, plan, cache, label_map, ids, modality)


class PatchDataset(torch.utils.data.Dataset):
    """One foreground-weighted random patch per case per epoch.

    One item per patient keeps DP-SGD's unit of privacy the patient. Items are
    plain ``(image, label)`` tuples: Opacus builds empty Poisson batches from the
    first sample's structure, which fails for MONAI's dictionaries.

    A patch depends only on (round seed, case, draw): before each item the
    transforms are reseeded from :class:`client.tasks.draws.PatientDraws`.
    With one stream per round, a case's patch would depend on the cases
    fetched before it, and MONAI's label-aware crops draw more or fewer
    numbers by a case's foreground, so one patient's labels would move the
    others' patches.

    Parameters
    ----------
    volumes : Dataset
        The preprocessed volumes (:func:`volume_dataset`).
    plan : Plan
        Patch size, sampling and augmentation.
    keys : list of str, optional
        A stable local key per case; default: the volumes' case ids
        (``volumes.case_ids``), which stay the same when the site's data
        folder moves. Not the index, which shifts when a case is added or
        removed.
    """

    def __init__(
        self,
        volumes: torch.utils.data.Dataset,
        plan: Plan,
        keys: list[str] | None = None,
    ) -> None:
        self.volumes = volumes
        if keys is None:
            keys = getattr(volumes, "case_ids", None)
            if keys is None:
                raise TypeError(
                    "PatchDataset needs a stable key per case: pass keys= or "
                    "volumes with .case_ids (volume_dataset)"
                )
        n = len(volumes)  # type: ignore[arg-type]
        if len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} cases")
        self.draws = PatientDraws(keys)
        both = [IMAGE, LABEL]
        if plan.patch_sampling == "label-classes":
            # centred on background, kidney, tumour and cyst by the plan's
            # ratios: small tumours and cysts are seen far more often than a
            # foreground/background crop would show them (issue 19)
            crop = mt.RandCropByLabelClassesd(
                keys=both,
                label_key=LABEL,
                spatial_size=plan.patch_size,
                ratios=list(plan.patch_class_ratios),
                num_classes=len(plan.patch_class_ratios),
                num_samples=1,
                warn=False,  # a case without a cyst is normal
            )
        else:
            crop = mt.RandCropByPosNegLabeld(
                keys=both,
                label_key=LABEL,
                spatial_size=plan.patch_size,
                pos=2.0,
                neg=1.0,
                num_samples=1,
            )
        augment = []
        if plan.augmentation:
            augment = [
                *(mt.RandFlipd(keys=both, prob=0.5, spatial_axis=a) for a in range(3)),
                mt.RandScaleIntensityd(keys=IMAGE, factors=0.1, prob=0.5),
                mt.RandShiftIntensityd(keys=IMAGE, offsets=0.1, prob=0.5),
            ]
        self.crop = mt.Compose(
            [mt.SpatialPadd(keys=both, spatial_size=plan.patch_size), crop, *augment]
        )

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Reseed every random transform for this case and draw; the volume is
        # the case's own, so the crop's label-dependent draws stay within it.
        self.crop.set_random_state(seed=self.draws.next(index))
        item = self.crop(self.volumes[index])[0]
        return (
            torch.as_tensor(item[IMAGE], dtype=torch.float32),
            torch.as_tensor(item[LABEL], dtype=torch.long),
        )

    def set_seed(self, seed: int) -> None:
        """Start a round: its seed (per site and round), every case's draw
        count at zero, so a case's ``k``-th patch of the round is the same
        whichever other cases are drawn."""
        self.draws.reset(seed)
