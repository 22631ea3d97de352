"""Sample slices for the run report, from synthetic (phantom) data only.

A real site's images never reach the report: a slice is rendered only for a
site whose YAML declares phantom data (``phantom:``) AND whose data folder was
written by kidneyfl's phantom generator (its ``phantom.json``). That happens in
local simulation, where the coordinator sees the simulated sites' YAMLs; in a
deployment the coordinator has no site YAML and no slice is ever made.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from client.tasks.segmentation.cases import load_site_cases
from client.tasks.segmentation.predict import segment
from common.artifacts import load_model_dir
from common.config import ConfigError, Plan, load_plan, load_site_config
from common.task_models import build_plan_model
from common.weights import import_state
from sim.phantoms.profiles import METADATA_NAME

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


def sample_slices(run_dir: Path) -> tuple[list[SampleSlice], list[str]]:
    """Phantom-only sample slices of a simulated run's final model.

    The simulation passes this to ``server.deliver.report``; the coordinator
    never imports it. Only the simulated sites of ``sim-site-configs`` are
    read, and a site is rendered solely when its YAML and data folder both say
    phantom.
    """
    run_dir = Path(run_dir)
    plan_path = run_dir / "plan.json"
    if not plan_path.is_file() or not (run_dir / "final" / "latest.json").is_file():
        return [], []
    plan = load_plan(json.loads(plan_path.read_text()))
    if not plan.site_config_paths or plan.task != "segmentation":
        return [], []
    state, _, eff_plan = load_model_dir(run_dir / "final")
    model = build_plan_model(eff_plan)
    import_state(model, state)
    with _quiet("client"):  # the sites' discovery lines are not the run's news
        return phantom_samples(plan.site_config_paths, model, eff_plan)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Logger ``name`` at WARNING and above only, for the block."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        logger.setLevel(level)
