"""Sample slices for the run report, from synthetic (phantom) data only.

A real site's images never reach the report: a slice is rendered only for a
site whose YAML declares phantom data (``phantom:``) AND whose data folder was
written by kidneyfl's phantom generator (its ``phantom.json``). That happens in
local simulation, where the coordinator sees the simulated sites' YAMLs; in a
deployment the coordinator has no site YAML and no slice is ever made.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from client.data import load_site_cases
from client.seg_predict import segment
from common.config import ConfigError, Plan, load_site_config
from common.phantom import METADATA_NAME

log = logging.getLogger(__name__)

PHANTOM_GENERATOR = "kidneyfl.common.phantom"


@dataclass(frozen=True)
class SampleSlice:
    """An axial slice in RAS orientation: HU image, reference and prediction."""

    site: str
    image: np.ndarray
    truth: np.ndarray | None
    pred: np.ndarray


def is_phantom_site(site_yaml: Path) -> bool:
    """True only for a site whose YAML and data folder both say phantom."""
    try:
        site = load_site_config(site_yaml)
    except ConfigError:
        return False
    marker = site.data.root / METADATA_NAME
    if site.phantom is None or not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("generator") == PHANTOM_GENERATOR
    except (OSError, ValueError):
        return False


def _canonical(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(arr, affine)).dataobj)


def phantom_samples(
    site_yamls: list[Path], model: torch.nn.Module, plan: Plan
) -> tuple[list[SampleSlice], list[str]]:
    """One slice per phantom site (its first validation case, the axial slice
    with the most kidney); also the names of sites skipped as not phantom."""
    samples, skipped = [], []
    for path in site_yamls:
        if not is_phantom_site(path):
            skipped.append(path.stem)
            continue
        site = load_site_config(path)
        cases = load_site_cases(site)
        case = (cases.validation or cases.train)[0]
        pred = segment(model, case.image, plan, torch.device("cpu"))
        img = nib.load(str(case.image))
        image = _canonical(np.asanyarray(img.dataobj, dtype=np.float32), img.affine)
        pred = _canonical(pred, img.affine)
        truth = None
        if case.label is not None:
            lab = nib.load(str(case.label))
            truth = _canonical(np.asanyarray(lab.dataobj).astype(np.uint8), lab.affine)
        ref = truth if truth is not None and truth.any() else pred
        z = int(np.argmax((ref > 0).sum(axis=(0, 1))))
        samples.append(
            SampleSlice(
                site.name,
                image[:, :, z],
                truth[:, :, z] if truth is not None else None,
                pred[:, :, z],
            )
        )
    return samples, skipped
