"""Apply a federated model to new scans: ``kidneyfl predict``.

Task-agnostic: the checkpoint's sidecar names the task, the model and the
preprocessing; the task plug-in (``client.tasks.base.Task.predict``) does the rest.
Runs where the scans are (at a hospital); nothing is sent anywhere.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from client.scan_check import SEEN_SCANS_KEY, ScanMismatch, scan_problems
from client.tasks.registry import get_task
from client.train import select_device
from common.artifacts import load_model_dir
from common.config import Plan
from common.task_models import build_plan_model
from common.weights import import_state

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# KiTS-style case folders hold the scan under this name.
CASE_IMAGE_NAMES = ("imaging.nii.gz", "imaging.nii")


def load_model(checkpoint: Path) -> tuple[torch.nn.Module, Plan, dict[str, Any]]:
    """The network of a checkpoint folder, with its effective plan and sidecar."""
    state, meta, plan = load_model_dir(checkpoint)
    model = build_plan_model(plan)
    import_state(model, state)
    model.eval()
    return model, plan, meta


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_scans(folder: Path) -> dict[str, Path]:
    """Scans in a folder: NIfTI files directly in it (``name.nii.gz``), and
    KiTS case folders (``case_00000/imaging.nii.gz``); name -> path."""
    scans: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name.endswith(NIFTI_SUFFIXES):
            scans[_stem(path)] = path
        elif path.is_dir():
            for name in CASE_IMAGE_NAMES:
                if (path / name).is_file():
                    scans[path.name] = path / name
                    break
    if not scans:
        raise FileNotFoundError(
            f"{folder}: no scans (*.nii.gz files or case folders with "
            "imaging.nii.gz); pass a NIfTI file or such a folder"
        )
    return scans


def predict(
    checkpoint: Path,
    source: Path,
    output: Path | None = None,
    json_path: Path | None = None,
    device: str = "auto",
    force: bool = False,
) -> dict[str, Any]:
    """Apply a checkpoint's model to one scan or a folder of scans.

    Parameters
    ----------
    checkpoint : Path
        A checkpoint folder, e.g. ``runs/<run>/final``.
    source : Path
        A NIfTI file, or a folder of them (see :func:`find_scans`).
    output : Path, optional
        For a file: the output file. For a folder: the output folder, one
        ``<name>.nii.gz`` per scan. Nothing is written when omitted.
    json_path : Path, optional
        Where to write the summary as JSON.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    force : bool
        Predict even on scans unlike the training data (see
        ``client/scan_check.py``); each such case, its output file and the
        summary then carry the reasons as warnings.

    Returns
    -------
    dict
        ``{"checkpoint", "task", "model", "cases": {name: task summary},
        "warnings": {name: [reason, ...]}}``.

    Raises
    ------
    ScanMismatch
        If a scan is unlike the training data and ``force`` is false; nothing
        is predicted or written then.
    """
    source, checkpoint = Path(source), Path(checkpoint)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such scan or folder")
    model, plan, meta = load_model(checkpoint)
    task = get_task(plan.task)
    dev = select_device(device)
    if source.is_dir():
        scans = find_scans(source)
        outputs = {
            n: (Path(output) / f"{n}.nii.gz" if output is not None else None)
            for n in scans
        }
    else:
        scans = {_stem(source): source}
        outputs = {_stem(source): Path(output) if output is not None else None}
    warnings = check_scans(scans, plan, meta, force)
    cases = {}
    for name, path in scans.items():
        log.info("predicting %s", name)
        cases[name] = task.predict(model, path, plan, dev, outputs[name])
        if name in warnings:
            cases[name]["warnings"] = warnings[name]
            mark_output(outputs[name], warnings[name])
    summary = {
        "checkpoint": str(checkpoint),
        "task": plan.task,
        "model": plan.model,
        "round": meta.get("round"),
        "preprocessing": meta.get("preprocessing"),
        "cases": cases,
        "warnings": warnings,
    }
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(summary, indent=2))
    return summary


def check_scans(
    scans: dict[str, Path], plan: Plan, meta: dict[str, Any], force: bool
) -> dict[str, list[str]]:
    """Problems per scan (segmentation models: CT in HU, spacing, field of view).

    Raises
    ------
    ScanMismatch
        Naming the first scan with problems and each problem, unless ``force``.
    """
    if plan.task != "segmentation":
        return {}
    found = {}
    for name, path in scans.items():
        problems = scan_problems(path, plan, meta.get(SEEN_SCANS_KEY))
        if problems and not force:
            raise ScanMismatch(
                f"{path}: refused, not like the scans this model was trained on: "
                + "; ".join(problems)
                + ". Nothing was written. If you are sure, pass --force (the "
                "output and the JSON then carry this warning)."
            )
        if problems:
            log.warning("%s: predicting anyway (--force): %s", name, problems)
            found[name] = problems
    return found


def mark_output(output: Path | None, problems: list[str]) -> None:
    """Say in a forced output's own header (NIfTI description) that it is one."""
    if output is None or not Path(output).is_file():
        return
    img = nib.load(str(output))
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    img.header["descrip"] = b"kidneyfl WARNING: forced; input unlike training data"
    nib.save(img, str(output))


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """One line per case for the terminal: volumes in mL, or the task's
    scalar outputs."""
    lines = []
    for name, res in summary["cases"].items():
        values = res.get("volumes-ml")
        if values is not None:
            text = ", ".join(f"{k} {v:.1f} mL" for k, v in values.items())
        else:
            text = ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in res.items()
                if isinstance(v, int | float | str) and k not in ("image", "output")
            )
        out = res.get("output")
        lines.append(f"{name}: {text}" + (f" -> {out}" if out else ""))
        for why in res.get("warnings", []):
            lines.append(f"  WARNING (forced): {why}")
    return lines
