"""Apply a federated model to new scans: ``kidneyfl predict``.

Task-agnostic: the checkpoint's sidecar names the task, the model and the
preprocessing; the task plug-in (``client.tasks.base.Task.predict``) does the rest.
Runs where the scans are (at a hospital); nothing is sent anywhere.

Every output says what it should not be trusted for, in three places: the
terminal (:func:`summary_lines`), the JSON summary (``model-warnings`` and
``warnings``) and each written NIfTI's description (:func:`descrip_text`):

- a scan predicted with ``--force`` despite failing ``client/scan_check.py``;
- a scan scored unlike the training data (``common/ood.py``: above the
  threshold calibrated on the sites' validation scans; segmentation only);
- every scan, when the model was trained on synthetic phantoms only (the
  sidecar's ``training-data``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from client.scan_check import SEEN_SCANS_KEY, ScanCheck, ScanMismatch, check_scan
from client.tasks.registry import get_task
from client.train import select_device
from common.artifacts import load_model_dir
from common.config import Plan
from common.ood import (
    OOD_REFERENCE_KEY,
    TRAINING_DATA_KEY,
    check_reference,
    furthest,
    model_warnings,
    ood_score,
    volume_features,
)
from common.postprocess import parse_rule
from common.task_models import build_plan_model
from common.weights import import_state

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# KiTS-style case folders hold the scan under this name.
CASE_IMAGE_NAMES = ("imaging.nii.gz", "imaging.nii")
# Short codes of a case's warnings (``warning-codes``), in this order, and
# how each is named in a NIfTI description (80 bytes: codes, not sentences).
FORCED, OOD, SYNTHETIC = "forced", "ood", "synthetic"
WARNING_CODES = (FORCED, OOD, SYNTHETIC)
_DESCRIP_LABELS = {FORCED: "forced", OOD: "ood", SYNTHETIC: "synthetic-phantom model"}
DESCRIP_BYTES = 80
# Case-dict keys of the NIfTI files a task writes; each carries the warnings.
WRITTEN_NIFTI_KEYS = ("output", "uncertainty-output")
# What of the sidecar's ood-reference the summary repeats (not the means).
_REFERENCE_SUMMARY_KEYS = (
    "threshold",
    "false-alarm-rate",
    "calibrated-on",
    "patients",
    "target",
)


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
    task_options: dict[str, Any] | None = None,
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
    task_options : dict, optional
        Passed to the task's ``predict`` (prognosis: ``labels``,
        ``segmentation_model``, ``age``, ``sex``).

    Returns
    -------
    dict
        ``{"checkpoint", "task", "model", "round", "preprocessing",
        "training-data", "model-warnings": [text], "ood-reference": {threshold,
        false-alarm-rate, calibrated-on, patients, target} or None,
        "cases": {name: task summary}, "warnings": {name: [text, ...]}}``.
        A segmentation case adds ``ood-score``, ``ood-threshold`` (None
        without a calibrated reference) and ``ood-furthest``; a case with
        warnings adds ``warnings``, ``warning-codes`` (:data:`WARNING_CODES`)
        and, when forced, ``forced`` (the check's reasons).

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
        if output is None:
            outputs = dict.fromkeys(scans)
        elif plan.task == "segmentation":
            outputs = {n: Path(output) / f"{n}.nii.gz" for n in scans}
        else:  # other tasks name their files inside the folder (<name>.json)
            outputs = dict.fromkeys(scans, Path(output))
    else:
        scans = {_stem(source): source}
        outputs = {_stem(source): Path(output) if output is not None else None}
    task_options = dict(task_options or {})
    if "segmentation_model" in task_options:  # prognosis: finds the crop's labels
        seg = Path(task_options["segmentation_model"])
        seg_model, seg_plan, _ = load_model(seg)
        task_options["segmentation_model"] = (seg_model, seg_plan, seg.name)
    rule = chosen_postprocess(meta)
    model_warns = model_warnings(meta)
    for text in model_warns:
        log.warning("%s: %s", checkpoint, text)
    checks = check_scans(scans, plan, meta, force)
    # the calibrated reference scores a segmentation's predicted volumes
    reference = ood_reference(meta) if checks and plan.task == "segmentation" else None
    cases: dict[str, dict[str, Any]] = {}
    warnings: dict[str, list[str]] = {}
    for name, path in scans.items():
        log.info("predicting %s", name)
        options = {"postprocess": rule} if plan.task == "segmentation" else {}
        options.update(task_options)
        res = task.predict(model, path, plan, dev, outputs[name], **options)
        texts = annotate_case(name, res, checks.get(name), reference, model_warns)
        if texts:
            warnings[name] = texts
        cases[name] = res
    summary = {
        "checkpoint": str(checkpoint),
        "task": plan.task,
        "model": plan.model,
        "round": meta.get("round"),
        "preprocessing": meta.get("preprocessing"),
        "training-data": meta.get(TRAINING_DATA_KEY),
        "model-warnings": model_warns,
        "ood-reference": (
            {k: reference.get(k) for k in _REFERENCE_SUMMARY_KEYS}
            if reference is not None
            else None
        ),
        "postprocess": rule,
        "cases": cases,
        "warnings": warnings,
    }
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(summary, indent=2))
    return summary


def chosen_postprocess(meta: dict[str, Any]) -> str:
    """The post-processing rule the federation chose (sidecar ``postprocess``,
    ``server/clinical_round.py``), or ``none`` for a model without one.

    Raises
    ------
    ValueError
        If the sidecar names a rule that does not parse (a damaged or
        hand-edited sidecar): better no prediction than another rule.
    """
    chosen = meta.get("postprocess")
    rule = chosen.get("rule") if isinstance(chosen, dict) else None
    if rule is None:
        return "none"
    try:
        parse_rule(str(rule))
    except ValueError as err:
        raise ValueError(
            f"the model's sidecar names post-processing {str(rule)[:80]!r}, which "
            f"is not a rule kidneyfl knows ({err}); restore the sidecar from the run"
        ) from None
    return str(rule)


# Tasks whose models read a 3D scan in the plan's modality (classification
# reads one slice, checked by its own loader).
SCAN_CHECKED = ("segmentation", "prognosis")


def check_scans(
    scans: dict[str, Path], plan: Plan, meta: dict[str, Any], force: bool
) -> dict[str, ScanCheck]:
    """Check every scan before any is predicted (segmentation and prognosis
    models: CT in HU, spacing, field of view); the checks keep each scan's
    image features.

    Returns
    -------
    dict
        Scan name -> :class:`~client.scan_check.ScanCheck`; empty for tasks
        not in :data:`SCAN_CHECKED`.

    Raises
    ------
    ScanMismatch
        Naming the first scan with problems and each problem, unless ``force``.
    """
    if plan.task not in SCAN_CHECKED:
        return {}
    found = {}
    for name, path in scans.items():
        check = check_scan(path, plan, meta.get(SEEN_SCANS_KEY))
        if check.problems and not force:
            raise ScanMismatch(
                f"{path}: refused, not like the scans this model was trained on: "
                + "; ".join(check.problems)
                + ". Nothing was written. If you are sure, pass --force (the "
                "output and the JSON then carry this warning)."
            )
        if check.problems:
            log.warning("%s: predicting anyway (--force): %s", name, check.problems)
        found[name] = check
    return found


def annotate_case(
    name: str,
    res: dict[str, Any],
    check: ScanCheck | None,
    reference: dict[str, Any] | None,
    model_warns: list[str],
) -> list[str]:
    """Add a predicted case's warnings to its summary ``res`` and its NIfTIs.

    The reasons it was forced, its out-of-distribution score (segmentation),
    the model's own warnings; in ``res`` as ``warnings`` and
    ``warning-codes``, in each written NIfTI's description. Returns the
    warnings (empty: none).
    """
    codes: list[str] = []
    texts: list[str] = []
    if check is not None and check.problems:
        res["forced"] = check.problems
        codes.append(FORCED)
        texts += check.problems
    if check is not None and "volumes-ml" in res:
        unlike = score_case(res, check, reference)
        if unlike is not None:
            log.warning("%s: %s", name, unlike)
            codes.append(OOD)
            texts.append(unlike)
    if model_warns:
        codes.append(SYNTHETIC)
        texts += model_warns
    if texts:
        res["warnings"], res["warning-codes"] = texts, codes
        for key in WRITTEN_NIFTI_KEYS:
            mark_output(res.get(key), codes)
    return texts


def ood_reference(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The sidecar's calibrated out-of-distribution reference, checked; None
    (said once in the log) when the model has none or an unusable one."""
    raw = meta.get(OOD_REFERENCE_KEY)
    if raw is None:
        log.warning(
            "this model's sidecar has no calibrated out-of-distribution reference "
            "(%s; older models): scans are not scored against the training data",
            OOD_REFERENCE_KEY,
        )
        return None
    try:
        ref = check_reference(raw)
        if "threshold" not in ref:
            raise ValueError("it has no calibrated threshold")
    except ValueError as exc:
        log.warning(
            "this model's %s is unusable (%s): scans are not scored against the "
            "training data",
            OOD_REFERENCE_KEY,
            exc,
        )
        return None
    return ref


def score_case(
    res: dict[str, Any], check: ScanCheck, reference: dict[str, Any] | None
) -> str | None:
    """Score a predicted segmentation case against the training data.

    Records ``ood-score``, ``ood-threshold`` and ``ood-furthest`` in ``res``
    (the scores None without a reference); returns the warning when the score
    is above the calibrated threshold, else None.
    """
    res["ood-score"], res["ood-threshold"] = None, None
    if reference is None or check.image_features is None:
        return None
    try:
        volumes = volume_features(res["volumes-ml"])
    except ValueError as exc:
        log.warning("no out-of-distribution score: %s", exc)
        return None
    features = np.concatenate([check.image_features, volumes])
    score, threshold = ood_score(features, reference), float(reference["threshold"])
    off = furthest(features, reference)
    res["ood-score"], res["ood-threshold"], res["ood-furthest"] = score, threshold, off
    if score <= threshold:
        return None
    named = ", ".join(f"{k} z={z:+.1f}" for k, z in off.items())
    return (
        f"unlike the training data: score {score:.2f} above the calibrated "
        f"threshold {threshold:g} (features furthest off: {named})"
    )


def descrip_text(codes: Sequence[str]) -> bytes:
    """A NIfTI description (at most 80 bytes) naming a case's warning codes.

    ``kidneyfl WARNING: forced; input unlike training data``, ``...: ood; ...``
    or ``...: synthetic-phantom model; not for real scans``; several codes
    are listed comma-separated before the one remark.
    """
    ordered = [c for c in WARNING_CODES if c in codes]
    labels = ",".join(_DESCRIP_LABELS[c] for c in ordered)
    tail = (
        "not for real scans" if SYNTHETIC in ordered else "input unlike training data"
    )
    return f"kidneyfl WARNING: {labels}; {tail}".encode()[:DESCRIP_BYTES]


def mark_output(output: Path | str | None, codes: Sequence[str]) -> None:
    """Say in a written NIfTI's own header (its description) which warnings
    its case carries; rewritten atomically (temp file, rename)."""
    if output is None or not codes or not Path(output).is_file():
        return
    output = Path(output)
    src = nib.load(str(output))
    # The stored values and their scaling as they are: a quantised map
    # (uint8 with a slope) would otherwise be rescaled by nibabel.
    img = nib.Nifti1Image(src.dataobj.get_unscaled(), src.affine, src.header)
    img.header.set_slope_inter(src.dataobj.slope, src.dataobj.inter)
    img.header["descrip"] = descrip_text(codes)
    tmp = output.with_name(f".tmp-{os.getpid()}-{output.name}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)


def lesion_lines(res: dict[str, Any]) -> list[str]:
    """A segmentation case's tumours with their planning measures, its other
    lesions with their confidence, and where the uncertainty map and summary
    image are (nothing for other tasks)."""
    lines = []
    if res.get("postprocess") not in (None, "none"):
        lines.append(
            f"  post-processing (chosen by the federation): {res['postprocess']}"
        )
    for i, t in enumerate(res.get("tumours") or [], 1):
        sinus = t.get("distance-to-sinus-mm")
        lines.append(
            f"  tumour {i}: {t.get('side')} kidney, {t.get('polar-location')}, "
            f"{t.get('volume-ml', 0):.1f} mL, max diameter "
            f"{t.get('max-diameter-mm', 0):.0f} mm, exophytic "
            f"{100 * t.get('exophytic-fraction', 0):.0f}%, to sinus "
            + (f"{sinus:.0f} mm" if isinstance(sinus, int | float) else "n/a")
        )
    for x in res.get("lesions") or []:
        lines.append(
            f"  {x.get('region')} lesion {x.get('volume-ml', 0):.1f} mL: confidence "
            f"{x.get('confidence', 0):.2f}, mean uncertainty "
            f"{x.get('uncertainty', 0):.2f}"
        )
    for key, what in (
        ("uncertainty-output", "uncertainty"),
        ("summary-image", "summary"),
    ):
        if res.get(key):
            lines.append(f"  {what}: {res[key]}")
    return lines


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """Lines for the terminal: the model's warnings, then one line per case
    (volumes in mL, or the task's scalar outputs) with its warnings."""
    model_warns = summary.get("model-warnings") or []
    head = [f"WARNING (model): {w}" for w in model_warns]
    lines = list(head)
    for name, res in summary["cases"].items():
        values = res.get("volumes-ml")
        if values is not None:
            text = ", ".join(f"{k} {v:.1f} mL" for k, v in values.items())
            if res.get("ood-score") is not None:
                text += (
                    f"; unlike-training score {res['ood-score']:.2f} "
                    f"(threshold {res['ood-threshold']:g})"
                )
        else:
            text = ", ".join(
                f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in res.items()
                if isinstance(v, int | float | str) and k not in ("image", "output")
            )
        out = res.get("output")
        lines.append(f"{name}: {text}" + (f" -> {out}" if out else ""))
        lines += lesion_lines(res)
        forced = res.get("forced", [])
        for why in res.get("warnings", []):
            if why not in model_warns:
                lines.append(f"  WARNING{' (forced)' if why in forced else ''}: {why}")
    if head and len(summary["cases"]) > 1:  # a long listing: say it again last
        lines += head
    return lines
