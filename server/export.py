"""Export the final model for use outside kidneyfl: TorchScript + preprocessing.

``runs/<run>/final/model.torchscript.pt`` loads with ``torch.jit.load`` alone
(no kidneyfl, no MONAI); ``final/preprocessing.json`` beside it says what input
it expects: RAS orientation, the voxel spacing, the HU window and normalisation,
the patch size for sliding-window inference, and the output classes.

What the model must not be used for travels with it: a model trained on
synthetic phantoms only (sidecar ``training-data``) says so in the
preprocessing JSON (``warnings``), inside the TorchScript file itself (the
extra file :data:`EXTRA_FILE`, read with ``torch.jit.load(path,
_extra_files={"kidneyfl.json": ""})``) and in the log of the export. The
JSON also carries the calibrated "unlike the training data" reference
(``common/ood.py``), so that tools outside kidneyfl can score scans the same way.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from common.artifacts import load_model_dir
from common.atomic import atomic_write_bytes
from common.metrics import LABELS
from common.ood import (
    FEATURES,
    OOD_REFERENCE_KEY,
    TRAINING_DATA_KEY,
    check_reference,
    model_warnings,
)
from common.task_models import build_plan_model
from common.weights import import_state

log = logging.getLogger("kidneyfl.server")

TORCHSCRIPT_NAME = "model.torchscript.pt"
PREPROCESSING_NAME = "preprocessing.json"
EXTRA_FILE = "kidneyfl.json"  # inside the TorchScript archive: provenance


def export_model(checkpoint: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Write the TorchScript model and its preprocessing JSON.

    Parameters
    ----------
    checkpoint : Path
        A checkpoint folder (``runs/<run>/final``).
    out_dir : Path, optional
        Where to write; the checkpoint folder by default.

    Returns
    -------
    dict
        ``{"model": path, "preprocessing": path}``. A synthetic-only model's
        warning is logged, and written into both.
    """
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir) if out_dir is not None else checkpoint
    state, meta, plan = load_model_dir(checkpoint)
    model = build_plan_model(plan)
    import_state(model, state)
    model.eval()
    description = _describe(meta, plan.task)
    provenance = {
        k: description[k] for k in ("warnings", "training-data", "weights-sha256")
    }
    example = torch.zeros((1, 1, *plan.patch_size), dtype=torch.float32)
    path = out_dir / TORCHSCRIPT_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # torch 2.13 marks TorchScript deprecated; it still loads everywhere
        # without Python model code, which is what hospitals' tools need.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            # Scripting keeps shape-dependent branches (BasicUNet pads odd sizes)
            scripted = torch.jit.script(model)
        except Exception as exc:  # noqa: BLE001 - any scripting failure: trace
            log.info("torch.jit.script failed (%s); tracing instead", exc)
            with torch.no_grad():
                scripted = torch.jit.trace(model, example, check_trace=False)
        extra = {EXTRA_FILE: json.dumps(provenance, indent=2)}
        torch.jit.save(scripted, buf, _extra_files=extra)
    atomic_write_bytes(path, buf.getvalue())
    prep_path = out_dir / PREPROCESSING_NAME
    atomic_write_bytes(prep_path, json.dumps(description, indent=2).encode())
    log.info("exported %s and %s", path, prep_path)
    for text in description["warnings"]:
        log.warning("exported model %s: %s (said in %s)", path, text, prep_path.name)
    return {"model": path, "preprocessing": prep_path}


# client/tasks/prognosis/data.py, in words, for a tool without kidneyfl.
PROGNOSIS_STEPS = [
    "crop: a cube of prognosis-crop-mm around the tumour's centroid (the largest "
    "kidney component without a tumour), axis-aligned in world coordinates, "
    "prognosis-crop-voxels a side, linear for the scan, nearest for the labels",
    "channel 0: the scan clipped to hu-window and scaled to [0, 1] (outside the "
    "scan 0); channel 1: labels, kidney 0.5, tumour 1, cyst 0.25",
    "covariates (0 when unused or unknown): (age band's typical age - 60) / 10, "
    "sex (-1 f, +1 m), log1p(tumour's largest extent in cm) - 1.5, then "
    "(tumour mean - kidney mean) / 50 HU, tumour SD / 50 HU, "
    "(tumour 10th percentile - kidney mean) / 50 HU",
    "output: one logit per interval of survival-edges-days; hazard = "
    "sigmoid(logit), survival at edge k = prod over j <= k of (1 - hazard_j); "
    "risk score = sum of softplus(logit)",
]
PROGNOSIS_INPUT = (
    "float32 tensor (batch, 6 + 2 x side^3): the 6 covariates, then the "
    "flattened 2-channel crop"
)


def _describe(meta: dict[str, Any], task: str) -> dict[str, Any]:
    prep = dict(meta["preprocessing"])
    source = prep.pop("source", "plan")
    normalise = (
        "clip to hu-window, then (x - intensity-mean) / intensity-std"
        if prep.get("intensity-mean") is not None
        else "clip to hu-window, then scale linearly to [0, 1]"
    )
    try:
        reference = check_reference(meta[OOD_REFERENCE_KEY])
    except (KeyError, ValueError):  # older model, or unusable: none to pass on
        reference = None
    return {
        "warnings": model_warnings(meta),
        "training-data": meta.get(TRAINING_DATA_KEY),
        "task": task,
        "model": meta.get("model"),
        "round": meta.get("round"),
        "weights-sha256": meta.get("sha256"),
        "preprocessing": prep,
        "preprocessing-source": source,
        "steps": PROGNOSIS_STEPS
        if task == "prognosis"
        else [
            "reorient to RAS",
            "resample to spacing-mm (linear)",
            normalise,
            "sliding-window inference with patch-size windows (overlap 0.25)",
            "argmax over output channels",
        ],
        "input": PROGNOSIS_INPUT
        if task == "prognosis"
        else "float32 tensor (batch, 1, x, y, z), RAS, after the steps above",
        "output-classes": {str(k): v for k, v in LABELS.items()}
        if task == "segmentation"
        else None,
        "ood-reference": reference,
        "ood-score": (
            "root-mean-square z-score of the features "
            f"({', '.join(FEATURES)}; kidneyfl common/ood.py) against mean and "
            "std; above threshold: unlike the training data"
        )
        if reference is not None
        else None,
    }
