"""The model a run hands back: a checkpoint folder that describes itself.

A checkpoint folder (``runs/<run>/final`` or ``runs/<run>/checkpoints``) holds
the weights and a JSON sidecar naming the plan, the model and the preprocessing
the model was trained with: the plan's own values, or the federated
preprocessing plan's when the run had a fingerprint round. Whoever applies the
model (``kidneyfl predict``, ``kidneyfl export``) reads everything from here.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from common.config import Plan, load_plan

LATEST = "latest.json"
PREPROCESSING_KEY = "preprocessing"  # in the sidecar
# Plan keys that define the preprocessing (kebab-case, as in run config).
PREPROCESSING_PLAN_KEYS = (
    "spacing-mm",
    "hu-window",
    "patch-size",
    "intensity-mean",
    "intensity-std",
)


class ArtifactError(RuntimeError):
    """A checkpoint folder is missing, damaged or does not describe itself."""


def effective_preprocessing(plan: Plan, prep: dict[str, Any] | None) -> dict[str, Any]:
    """The preprocessing a run's sites applied, as plan keys.

    Parameters
    ----------
    plan : Plan
        The run's plan.
    prep : dict or None
        The federated preprocessing plan (``preprocessing.json``: ``spacing-mm``,
        ``hu-window``, ``patch-size``, ``foreground-mean``, ``foreground-std``),
        or None when the run had no fingerprint round.
    """
    out: dict[str, Any] = {
        "spacing-mm": list(plan.spacing_mm),
        "hu-window": list(plan.hu_window),
        "patch-size": list(plan.patch_size),
        "intensity-mean": plan.intensity_mean,
        "intensity-std": plan.intensity_std,
        "source": "plan",
    }
    if prep:
        out.update(
            {
                "spacing-mm": [float(v) for v in prep["spacing-mm"]],
                "hu-window": [float(v) for v in prep["hu-window"]],
                "patch-size": [int(v) for v in prep["patch-size"]],
                "intensity-mean": float(prep["foreground-mean"]),
                "intensity-std": float(prep["foreground-std"]),
                "source": "federated preprocessing plan",
            }
        )
    return out


def plan_with_preprocessing(
    plan_dict: dict[str, Any], preprocessing: dict[str, Any] | None
) -> Plan:
    """The plan a model must be applied with: the saved plan, with the saved
    preprocessing on top."""
    merged = dict(plan_dict)
    for key in PREPROCESSING_PLAN_KEYS:
        if preprocessing and key in preprocessing:
            merged[key] = preprocessing[key]
    return load_plan(merged, source="checkpoint sidecar plan")


def load_model_dir(
    path: Path,
) -> tuple[OrderedDict[str, torch.Tensor], dict[str, Any], Plan]:
    """Weights, sidecar and effective plan of a checkpoint folder.

    Parameters
    ----------
    path : Path
        A folder with ``latest.json`` (``runs/<run>/final``), or a sidecar
        ``round-NNNN.json`` itself.

    Raises
    ------
    ArtifactError
        If the folder has no sidecar, the weights fail their checksum, or the
        sidecar lacks the plan.
    """
    path = Path(path)
    side = path / LATEST if path.is_dir() else path
    if not side.is_file():
        raise ArtifactError(
            f"{path}: no checkpoint sidecar ({LATEST}); pass runs/<run>/final"
        )
    try:
        meta = json.loads(side.read_text())
        data = (side.parent / meta["weights"]).read_bytes()
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{side}: unreadable checkpoint ({exc})") from None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ArtifactError(f"{side.parent / meta['weights']}: checksum mismatch")
    if "plan" not in meta:
        raise ArtifactError(f"{side}: sidecar has no plan; not a kidneyfl checkpoint")
    prep = meta.get(PREPROCESSING_KEY)
    run_prep = side.parent.parent / "preprocessing.json"
    if prep is None and run_prep.is_file():
        # checkpoints written before sidecars carried their preprocessing
        prep = effective_preprocessing(
            load_plan(meta["plan"]), json.loads(run_prep.read_text())
        )
    plan = plan_with_preprocessing(meta["plan"], prep)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    meta[PREPROCESSING_KEY] = prep or effective_preprocessing(plan, None)
    return state, meta, plan
