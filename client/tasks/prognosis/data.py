"""A prognosis site's patients as tensors: a crop of the scan around the
tumour, the pre-operative covariates, and the outcome.

The crop is a cube of ``prognosis-crop-mm`` on a side, sampled on a grid of
``prognosis-crop-voxels`` per side, axis-aligned in the scanner's world
coordinates and centred on the tumour (the largest kidney component when the
patient has no tumour), so it does not depend on the scan's voxel order or
spacing. Two channels: the scan (CT clipped to the plan's ``hu-window`` and
scaled to [0, 1]; MR z-scored inside the crop) and the label map (kidney 0.5,
tumour 1, cyst 0.25). The labels come from the site's reference segmentation
in training and validation; ``predict`` takes them from a file or from a
segmentation model and says which (:mod:`client.tasks.prognosis.predict`).

A patient is one item: ``x`` is the covariates followed by the flattened crop
(one tensor, so Opacus' per-sample gradients see one input with the batch
first), ``y`` is ``(time in days, event)``.

Covariates (the plan's ``prognosis-covariates``; the others are 0): age from
the site's age band (the raw age is not kept, :mod:`client.data.subgroups`),
sex (-1 female, +1 male, 0 unknown), the tumour's largest extent in cm, and
three first-order radiomics of the tumour against the kidney
(:func:`first_order`), the last two measured on the same labels as the crop
(0 without a tumour), so training and ``predict`` measure them the same way.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from client.data.errors import SiteDataError
from client.data.layouts import Case
from client.data.outcomes import Outcome, read_outcomes
from client.tasks.segmentation.cases import load_site_cases
from common.config import Plan, SiteConfig
from common.prognosis_net import IMAGE_CHANNELS, N_COVARIATES

log = logging.getLogger("kidneyfl.client")

# The network's covariate inputs, always (unused ones 0): age, sex, size,
# then the tumour's first-order radiomics (RADIOMICS).
RADIOMICS = ("enhancement", "heterogeneity", "low-tail")
assert N_COVARIATES == 3 + len(RADIOMICS)  # the network's (common.prognosis_net)
KIDNEY, TUMOUR, CYST = 1, 2, 3
_LABEL_VALUE = {KIDNEY: 0.5, TUMOUR: 1.0, CYST: 0.25}
# Age bands (client.data.subgroups.AGE_BANDS) at a typical age within them.
_BAND_AGE = {"u40": 35.0, "40to59": 50.0, "60to69": 65.0, "70plus": 77.0}


@dataclass(frozen=True)
class Crop:
    """One scan's crop and what was measured on its labels."""

    image: np.ndarray  # (IMAGE_CHANNELS, s, s, s) float32
    size_cm: float  # the tumour's largest extent; 0 without a tumour
    centre: str  # "tumour" or "kidney": what the crop is centred on
    radiomics: np.ndarray  # (len(RADIOMICS),) float32; 0 without a tumour


def crop_scan(
    image: np.ndarray, affine: np.ndarray, labels: np.ndarray, plan: Plan, mr: bool
) -> Crop:
    """The plan's crop around the tumour (or the largest kidney component).

    Raises
    ------
    ValueError
        If the labels have neither kidney nor tumour, or the image and label
        grids differ.
    """
    if image.shape != labels.shape:
        raise ValueError(
            f"image {image.shape} and labels {labels.shape} differ in shape"
        )
    tumour = labels == TUMOUR
    if tumour.any():
        centre_vox, what = np.argwhere(tumour).mean(0), "tumour"
    else:
        kidney = labels == KIDNEY
        components, n = ndimage.label(kidney)
        if n == 0:
            raise ValueError("the labels have no kidney and no tumour to crop around")
        sizes = ndimage.sum(kidney, components, range(1, n + 1))
        largest = components == (int(np.argmax(sizes)) + 1)
        centre_vox, what = np.argwhere(largest).mean(0), "kidney"
    affine = np.asarray(affine, dtype=np.float64)
    centre = affine[:3, :3] @ centre_vox + affine[:3, 3]
    s = plan.prognosis_crop_voxels
    step = plan.prognosis_crop_mm / s
    axis = (np.arange(s) - (s - 1) / 2) * step
    world = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), 0).reshape(3, -1)
    world += centre[:, None]
    inv = np.linalg.inv(affine)
    vox = inv[:3, :3] @ world + inv[:3, 3:4]
    scan = ndimage.map_coordinates(
        image.astype(np.float32), vox, order=1, mode="constant", cval=np.nan
    ).reshape(s, s, s)
    lab = ndimage.map_coordinates(labels, vox, order=0, mode="constant", cval=0)
    lab = lab.reshape(s, s, s)
    out = np.zeros((IMAGE_CHANNELS, s, s, s), dtype=np.float32)
    out[0] = _normalise(scan, plan, mr)
    for value, level in _LABEL_VALUE.items():
        out[1][lab == value] = level
    size = tumour_extent_cm(tumour, affine)
    return Crop(out, size, what, first_order(image, labels, mr))


def first_order(image: np.ndarray, labels: np.ndarray, mr: bool) -> np.ndarray:
    """The tumour's first-order radiomics against the kidney, from the scan as
    stored: enhancement (mean tumour minus mean kidney), heterogeneity (the
    tumour's standard deviation) and low tail (its 10th percentile minus the
    kidney's mean): the attenuation a radiologist reads, including a
    necrotic core. CT in units of 50 HU; MR relative to the kidney's mean
    (its units are arbitrary). Zeros without a tumour or a kidney."""
    tumour, kidney = image[labels == TUMOUR], image[labels == KIDNEY]
    out = np.zeros(len(RADIOMICS), dtype=np.float32)
    if tumour.size == 0 or kidney.size == 0:
        return out
    ref = float(kidney.mean())
    scale = max(abs(ref), 1e-6) if mr else 50.0
    out[:] = (
        (float(tumour.mean()) - ref) / scale,
        float(tumour.std()) / scale,
        (float(np.percentile(tumour, 10)) - ref) / scale,
    )
    return np.clip(out, -20.0, 20.0)


def _normalise(scan: np.ndarray, plan: Plan, mr: bool) -> np.ndarray:
    """CT: the plan's HU window to [0, 1], outside the scan as air (0); MR:
    z-score over the part of the crop inside the scan."""
    inside = np.isfinite(scan)
    if mr:
        vals = scan[inside]
        mean, std = (vals.mean(), vals.std()) if vals.size else (0.0, 1.0)
        out = (scan - mean) / max(float(std), 1e-6)
    else:
        lo, hi = plan.hu_window
        out = (np.clip(scan, lo, hi) - lo) / (hi - lo)
    return np.where(inside, out, 0.0).astype(np.float32)


def tumour_extent_cm(tumour: np.ndarray, affine: np.ndarray) -> float:
    """The largest side of the tumour's box in world coordinates, in cm
    (voxel centres, plus one voxel's size along that axis); 0 without one."""
    if not tumour.any():
        return 0.0
    idx = np.argwhere(tumour).T.astype(np.float64)
    world = affine[:3, :3] @ idx
    voxel = np.abs(affine[:3, :3]).sum(1)
    extent = world.max(1) - world.min(1) + voxel
    return float(extent.max()) / 10.0


def covariates(
    outcome: Outcome | None,
    size_cm: float,
    plan: Plan,
    radiomics: np.ndarray | None = None,
) -> np.ndarray:
    """The network's covariate inputs for one patient (unused ones 0)."""
    values = np.zeros(N_COVARIATES, dtype=np.float32)
    use = set(plan.prognosis_covariates)
    if "age" in use and outcome is not None and outcome.age_band in _BAND_AGE:
        values[0] = (_BAND_AGE[outcome.age_band] - 60.0) / 10.0
    if "sex" in use and outcome is not None and outcome.sex in ("f", "m"):
        values[1] = -1.0 if outcome.sex == "f" else 1.0
    if "size" in use:
        values[2] = float(np.log1p(size_cm)) - 1.5
    if "radiomics" in use and radiomics is not None:
        values[3:] = radiomics
    return values


def patient_input(crop: Crop, covs: np.ndarray) -> torch.Tensor:
    """One patient's network input: covariates, then the flattened crop."""
    return torch.from_numpy(np.concatenate([covs, crop.image.reshape(-1)]))


class PatientDataset(Dataset):
    """Patients as ``(x, (time, event))``; ``case_ids`` stay at the site."""

    def __init__(
        self,
        inputs: list[torch.Tensor],
        targets: list[tuple[float, int]],
        ids: list[str],
    ) -> None:
        width = inputs[0].numel() if inputs else N_COVARIATES
        self.x = torch.stack(inputs) if inputs else torch.zeros((0, width))
        self.y = torch.tensor(targets, dtype=torch.float32).reshape(-1, 2)
        self.case_ids = ids

    def __len__(self) -> int:
        return len(self.case_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def set_seed(self, seed: int) -> None:
        """Start a round. Nothing is drawn per patient (no augmentation: a
        patient's item is the same in every round), so there is nothing to
        seed; Opacus' Poisson sampling draws from the site's own entropy."""

    @property
    def time(self) -> np.ndarray:
        return self.y[:, 0].numpy().astype(np.float64)

    @property
    def event(self) -> np.ndarray:
        return self.y[:, 1].numpy().astype(np.int64)


@dataclass
class PrognosisData:
    """A site's prognosis patients, split; what was left out and why (local)."""

    train: PatientDataset
    validation: PatientDataset
    left_out: dict[str, str]
    fingerprint: str


_CROPS: dict[tuple, Crop] = {}  # per process: (file, mtime, crop plan) -> crop


def load_crop(case: Case, plan: Plan, mr: bool) -> Crop:
    """A case's crop from its image and reference labels, memoised per process
    (every request re-reads the site's data; the files rarely change)."""
    assert case.label is not None
    key = (
        str(case.image),
        case.image.stat().st_mtime_ns,
        str(case.label),
        case.label.stat().st_mtime_ns,
        plan.prognosis_crop_mm,
        plan.prognosis_crop_voxels,
        plan.hu_window,
        mr,
    )
    if key not in _CROPS:
        img = nib.load(str(case.image))
        image = np.asarray(img.dataobj, dtype=np.float32)
        labels = np.asarray(nib.load(str(case.label)).dataobj).astype(np.uint8)
        _CROPS[key] = crop_scan(image, img.affine, labels, plan, mr)
    return _CROPS[key]


def load_prognosis_data(site: SiteConfig, plan: Plan) -> PrognosisData:
    """The site's cases with an outcome, cropped, split as segmentation splits.

    Raises
    ------
    SiteDataError
        No outcome source, an invalid outcome (from
        :func:`client.data.outcomes.read_outcomes`, naming the file and row),
        or fewer than 2 training patients with an outcome.
    """
    cases = load_site_cases(site)
    outcomes = read_outcomes(site)
    if not outcomes:
        raise SiteDataError(
            f"site {site.name}: no outcomes found under {site.data.root} "
            "(outcomes.csv, the manifest's time and event columns, or kits.json); "
            "prognosis needs each patient's follow-up time and event. Run "
            "`kidneyfl site check` for what was found"
        )
    mr = site.data.modality == "MR"
    left_out: dict[str, str] = {}
    splits = []
    for group in (cases.train, cases.validation):
        inputs, targets, ids = [], [], []
        for case in group:
            outcome = outcomes.get(case.case_id)
            if outcome is None:
                left_out[case.case_id] = "no outcome"
                continue
            try:
                crop = load_crop(case, plan, mr)
            except (OSError, ValueError) as err:
                left_out[case.case_id] = f"cannot crop: {err}"
                log.warning("prognosis: case %s left out: %s", case.case_id, err)
                continue
            covs = covariates(outcome, crop.size_cm, plan, crop.radiomics)
            inputs.append(patient_input(crop, covs))
            targets.append((outcome.time, outcome.event))
            ids.append(case.case_id)
        splits.append(PatientDataset(inputs, targets, ids))
    if left_out:
        log.info(
            "prognosis: %d case(s) left out (no outcome or no crop)", len(left_out)
        )
    train, val = splits
    if len(train) < 2:
        raise SiteDataError(
            f"site {site.name}: {len(train)} training patient(s) with an outcome; "
            "at least 2 are needed. Run `kidneyfl site check` for the list of "
            "problems"
        )
    digest = hashlib.sha256(cases.fingerprint().encode())
    digest.update(repr(sorted(train.case_ids)).encode())
    digest.update(train.y.numpy().tobytes())
    return PrognosisData(train, val, left_out, digest.hexdigest()[:16])


def scan_crop(
    image_path: Path, labels: np.ndarray, plan: Plan, mr: bool
) -> tuple[Crop, np.ndarray]:
    """``predict``'s crop of a new scan with labels on its grid; the affine."""
    img = nib.load(str(image_path))
    image = np.asarray(img.dataobj, dtype=np.float32)
    return crop_scan(image, img.affine, labels, plan, mr), img.affine
