"""Membership inference against a trained model, at the site, on its own data.

``kidneyfl site audit-privacy sites/<site>.yaml --checkpoint runs/<run>/final``
attacks the model the way an adversary holding it would: can it tell the site's
training patients from its held-out (validation) patients? Nothing leaves the
site: the report is written to the site's state directory and printed.

Attacks, on one number per patient (whole-volume loss for segmentation, the
mean cross-entropy of the patient's slices for classification):

- **loss threshold** (Yeom et al., CSF 2018): members have lower loss; score
  ``-loss``.
- **calibrated** (reference-model-free, in the spirit of RMIA, Zarifzadeh et
  al., ICML 2024, and difficulty calibration, Watson et al., ICLR 2022): the
  likelihood ratio of a patient under the trained model against a reference
  that never saw any patient, the plan's identically initialised network (the
  federation's starting point); score ``loss_ref - loss``. It removes how hard
  a patient is in itself. With one reference and RMIA's ``gamma = 1`` the
  pairwise RMIA score ranks patients exactly as this ratio does.

Each gives the attack AUC (Hanley-McNeil 95 % interval), TPR at 1 % and 0.1 %
FPR, and the lower bound on epsilon these rates imply at the site's delta, with
Clopper-Pearson intervals (:mod:`common.audit_bounds`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from client.predict import load_model
from client.tasks.registry import get_task
from client.train import select_device
from common.atomic import atomic_write_text
from common.audit_bounds import attack_auc, operating_point
from common.config import Plan, SiteConfig, load_site_config
from common.task_models import build_plan_model

log = logging.getLogger(__name__)

REPORT_FORMAT = "kidneyfl-privacy-audit/1"
TARGET_FPRS = (0.01, 0.001)
MIN_PATIENTS = 2  # per side; fewer and no rate means anything


# -- one loss per patient, per task -------------------------------------------
@torch.no_grad()
def _segmentation_losses(
    model: nn.Module, volumes: Any, plan: Plan, device: torch.device
) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    from client.tasks.segmentation.pipeline import IMAGE, LABEL

    loss_fn = get_task("segmentation").loss(plan)
    out = []
    for i in range(len(volumes)):
        item = volumes[i]
        image = item[IMAGE].unsqueeze(0).to(device)
        label = item[LABEL].unsqueeze(0).long().to(device)
        logits = sliding_window_inference(
            image, plan.patch_size, sw_batch_size=16, predictor=model, overlap=0.25
        )
        out.append(float(loss_fn(logits, label)))
    return np.array(out, dtype=float)


@torch.no_grad()
def _classification_losses(
    model: nn.Module, slices: Any, plan: Plan, device: torch.device
) -> np.ndarray:
    per_slice = []
    for start in range(0, len(slices.labels), 64):
        x = slices.images[start : start + 64].to(device)
        y = slices.labels[start : start + 64].to(device)
        per_slice.append(F.cross_entropy(model(x), y, reduction="none").cpu())
    if not per_slice:
        return np.zeros(0)
    ce = torch.cat(per_slice).numpy().astype(float)
    # the patient is the unit: mean over each patient's slices
    return np.array([ce[group].mean() for group in slices.patients], dtype=float)


def _segmentation_data(site: SiteConfig, plan: Plan) -> tuple[Any, Any]:
    from client.tasks.segmentation.cases import load_site_cases
    from client.tasks.segmentation.pipeline import volume_dataset

    cases = load_site_cases(site)  # the same split training used
    lm = cases.label_map
    return (
        volume_dataset(cases.train, site, plan, lm),
        volume_dataset(cases.validation, site, plan, lm),
    )


def _classification_data(site: SiteConfig, plan: Plan) -> tuple[Any, Any]:
    from client.tasks.classification.data import build_dataset, load_site_slices

    train, val, _ = load_site_slices(site, plan)  # the same split training used
    return build_dataset(train, plan), build_dataset(val, plan)  # no augmentation


def _prognosis_data(site: SiteConfig, plan: Plan) -> tuple[Any, Any]:
    from client.tasks.prognosis.data import load_prognosis_data

    data = load_prognosis_data(site, plan)  # the same split training used
    return data.train, data.validation


@torch.no_grad()
def _prognosis_losses(
    model: nn.Module, patients: Any, plan: Plan, device: torch.device
) -> np.ndarray:
    loss_fn = get_task("prognosis").loss(plan)
    model.to(device).eval()
    return np.array(
        [
            float(
                loss_fn(
                    model(patients.x[i : i + 1].to(device)).cpu(), patients.y[i : i + 1]
                )
            )
            for i in range(len(patients))
        ],
        dtype=float,
    )


# Per task: (train, held-out) data without augmentation, and a loss per patient.
AUDIT_DATA: dict[str, Callable[[SiteConfig, Plan], tuple[Any, Any]]] = {
    "segmentation": _segmentation_data,
    "classification": _classification_data,
    "prognosis": _prognosis_data,
}
PER_CASE_LOSS: dict[str, Callable[..., np.ndarray]] = {
    "segmentation": _segmentation_losses,
    "classification": _classification_losses,
    "prognosis": _prognosis_losses,
}


# -- the attacks ---------------------------------------------------------------
def attack_report(
    scores_in: np.ndarray, scores_out: np.ndarray, delta: float, confidence: float
) -> dict[str, Any]:
    """AUC and the operating points at :data:`TARGET_FPRS` for one attack.

    Each operating point's bound is at ``confidence``; ``epsilon_lb`` (their
    maximum) is reported at ``confidence`` too, because every point was
    computed at the Bonferroni level ``1 - (1 - confidence) / len(TARGET_FPRS)``.
    """
    auc, se = attack_auc(scores_in, scores_out)
    each = 1.0 - (1.0 - confidence) / len(TARGET_FPRS)
    points = [
        operating_point(scores_in, scores_out, f, delta, each) for f in TARGET_FPRS
    ]
    return {
        "auc": auc,
        "auc_ci95": [max(0.0, auc - 1.96 * se), min(1.0, auc + 1.96 * se)],
        "operating_points": [p.to_dict() for p in points],
        "epsilon_lb": max(p.epsilon_lb for p in points),
    }


def membership_attacks(
    loss_in: np.ndarray,
    loss_out: np.ndarray,
    ref_in: np.ndarray,
    ref_out: np.ndarray,
    delta: float,
    confidence: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Both attacks on per-patient losses of members (``in``) and held-out
    patients (``out``) under the model and the reference."""
    return {
        "loss-threshold": attack_report(-loss_in, -loss_out, delta, confidence),
        "calibrated": attack_report(
            ref_in - loss_in, ref_out - loss_out, delta, confidence
        ),
    }


def _accountant_epsilon(checkpoint: Path, meta: dict, site: SiteConfig) -> Any:
    """The epsilon the run's ledger reported for this site, where recorded."""
    for side in (meta, _read_json(checkpoint.parent / "checkpoints" / "latest.json")):
        per_site = (side or {}).get("epsilon_per_site") or {}
        if per_site.get(site.name) is not None:
            return float(per_site[site.name])
    return None


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def audit_site(
    site_yaml: str | Path,
    checkpoint: str | Path,
    out: str | Path | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Run both membership attacks at a site and write the local JSON report.

    Parameters
    ----------
    site_yaml : path
        The site's YAML (its data, split, delta and state directory).
    checkpoint : path
        A checkpoint folder, e.g. ``runs/<run>/final``.
    out : path, optional
        Where to write the JSON; default
        ``<state_dir>/privacy-audit/<run>-<time>.json``.

    Raises
    ------
    ValueError
        If the site has fewer than :data:`MIN_PATIENTS` training or held-out
        patients.
    """
    site = load_site_config(site_yaml)
    checkpoint = Path(checkpoint)
    model, plan, meta = load_model(checkpoint)
    if site.cpu_threads:
        torch.set_num_threads(site.cpu_threads)
    device = select_device(site.device)
    train, held_out = _audit_data(site, plan)
    reference = build_plan_model(plan).eval()  # the run's starting point
    t0 = time.perf_counter()
    loss_in, loss_out = _losses(model, (train, held_out), plan, device)
    ref_in, ref_out = _losses(reference, (train, held_out), plan, device)
    # without DP the site has no delta; 1/(10 x patients) is the usual choice
    delta = site.privacy.delta or 1.0 / (10 * (len(loss_in) + len(loss_out)))
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "site": site.name,
        "checkpoint": str(checkpoint),
        "model": plan.model,
        "task": plan.task,
        "round": meta.get("round"),
        "time": time.time(),
        "members": len(loss_in),
        "non_members": len(loss_out),
        "delta": delta,
        "confidence": confidence,
        "accountant_epsilon": _accountant_epsilon(checkpoint, meta, site),
        "dp_enabled": site.privacy.enabled,
        "mean_loss": {
            "members": float(loss_in.mean()),
            "non_members": float(loss_out.mean()),
        },
        "attacks": membership_attacks(
            loss_in, loss_out, ref_in, ref_out, delta, confidence
        ),
        "seconds": time.perf_counter() - t0,
    }
    return _write_report(report, checkpoint, site, out)


def _audit_data(site: SiteConfig, plan: Plan) -> tuple[Any, Any]:
    """Training and held-out patients, at least :data:`MIN_PATIENTS` of each."""
    train, held_out = AUDIT_DATA[plan.task](site, plan)
    if min(len(train), len(held_out)) < MIN_PATIENTS:
        raise ValueError(
            f"site {site.name}: {len(train)} training and {len(held_out)} held-out "
            f"patients; the audit needs at least {MIN_PATIENTS} of each. Set "
            f"data.validation_fraction (or data.validation_cases) in {site.source}"
        )
    return train, held_out


def _losses(
    model: nn.Module, datasets: tuple[Any, Any], plan: Plan, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """One loss per patient of each dataset under ``model``."""
    losses = PER_CASE_LOSS[plan.task]
    model.to(device)
    first, second = (losses(model, d, plan, device) for d in datasets)
    return first, second


def _write_report(
    report: dict[str, Any], checkpoint: Path, site: SiteConfig, out: str | Path | None
) -> dict[str, Any]:
    """Write the JSON at the site (default ``<state_dir>/privacy-audit/``)."""
    if out is None:
        run = checkpoint.resolve().parent.name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = site.state_dir / "privacy-audit" / f"{run}-{stamp}.json"
    out = Path(out)
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    report["path"] = str(out)
    log.info("privacy audit of %s written to %s", checkpoint, out)
    return report


def format_audit(report: dict[str, Any]) -> str:
    """The report as a table a privacy officer can read."""
    eps = report["accountant_epsilon"]
    claimed = f"{eps:.3f}" if eps is not None else "not recorded"
    lines = [
        f"Membership-inference audit of {report['checkpoint']} "
        f"(model {report['model']}, round {report['round']})",
        f"site {report['site']}: {report['members']} training patients vs "
        f"{report['non_members']} held-out patients; delta {report['delta']:g}; "
        f"accountant's epsilon {claimed}",
        f"mean loss: training patients {report['mean_loss']['members']:.3f}, "
        f"held-out patients {report['mean_loss']['non_members']:.3f}",
        "",
        f"{'attack':<16}{'AUC (95% CI)':>22}{'TPR@1%FPR':>11}{'TPR@0.1%FPR':>13}"
        f"{'eps lower bound':>17}",
    ]
    for name, a in report["attacks"].items():
        lo, hi = a["auc_ci95"]
        tprs = [p["tpr"] for p in a["operating_points"]]
        lines.append(
            f"{name:<16}{a['auc']:>8.3f} ({lo:.3f}-{hi:.3f}){tprs[0]:>11.3f}"
            f"{tprs[1]:>13.3f}{a['epsilon_lb']:>17.3f}"
        )
    worst = max(a["epsilon_lb"] for a in report["attacks"].values())
    lines += [
        "",
        "AUC 0.5 = the attacker does no better than a coin. The lower bound holds "
        f"at {report['confidence']:.0%} confidence (Clopper-Pearson);",
        "it shows leakage the model certainly has, never that it has no more: "
        "a bound of 0 is not a proof of privacy.",
    ]
    if eps is not None and worst > eps:
        lines.append(
            f"WARNING: measured leakage {worst:.3f} exceeds the accountant's "
            f"epsilon {eps:.3f}: the DP guarantee does not hold for this model."
        )
    if report["non_members"] < 1 / TARGET_FPRS[0]:
        lines.append(
            f"note: with {report['non_members']} held-out patients the lowest "
            f"measurable FPR is {1 / report['non_members']:.3f}; TPR at low FPR is "
            "then the TPR at zero false positives."
        )
    lines.append(f"report written to {report.get('path', '(not written)')}")
    return "\n".join(lines)


def epsilon_summary(report: dict[str, Any]) -> float:
    """The largest lower bound over the attacks (0 when none leaks)."""
    return max((a["epsilon_lb"] for a in report["attacks"].values()), default=0.0)
