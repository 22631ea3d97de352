"""Black-box one-run audit of a simulated federation with canary patients.

``kidneyfl simulate --audit-canaries N`` (Steinke, Nasr and Jagielski, NeurIPS
2023, black-box setting): N phantom patients, each carrying a distinctive marker
(a textured cube inside the body, labelled tumour or cyst by a coin of its own,
so no rule predicts the label and only memorising that patient helps). Each
canary joins the audited site's training set with probability 1/2 (a coin from
the OS entropy pool, :mod:`secrets`); the run trains once, as planned, with DP.
Afterwards every canary is scored by the final model's cross-entropy on its
marker (lower = more likely trained on), the auditor guesses the top and bottom
k, and the number of correct guesses gives a lower bound on epsilon next to the
accountant's.

The audited site is the first site of the simulation. Its data are not copied:
the audit builds a folder of links to its cases plus the included canaries, and
a site YAML that names the split explicitly (the site's own split, canaries in
training), with its own state directory, so the audit spends no budget of the
real site's ledger.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from client.privacy.canaries import inclusion_coins
from client.tasks.segmentation.cases import load_site_cases
from client.tasks.segmentation.pipeline import IMAGE, LABEL, preprocessing
from common.audit_bounds import attack_auc, best_guess_bound
from common.config import SiteConfig, load_site_config

log = logging.getLogger(__name__)

AUDIT_DIR = "privacy-audit"
RESULT_NAME = "privacy-audit.json"
MARKER_NAME = "marker.nii.gz"
CANARY_PREFIX = "case_canary_"
MARKER_MM = 24.0  # side of the cube
MARKER_HU = 280.0


def write_canaries(
    site: SiteConfig, n: int, out_dir: Path, seed: int = 0
) -> list[Path]:
    """Write ``n`` canary patients (KiTS layout plus ``marker.nii.gz``).

    The anatomy is a phantom of the site's own profile; the marker's place and
    label (2 tumour or 3 cyst) come from the canary's seed, not from the
    inclusion coin.
    """
    from sim.phantoms.kits_writer import _save_nifti
    from sim.phantoms.profiles import DEFAULT_SCALE
    from sim.phantoms.sites import site_profile

    if site.phantom is None:
        raise ValueError(
            f"site {site.name}: canary patients are phantoms of the site's profile; "
            f"give {site.source} a phantom section (simulation sites only)"
        )
    from sim.phantoms.ct import generate_case

    profile = site_profile(site)
    scale = site.phantom.scale or DEFAULT_SCALE
    dirs = []
    for i in range(n):
        rng = np.random.default_rng([seed, 7919, i])
        case = generate_case(profile, int(rng.integers(2**31)), scale)
        side = np.maximum(2, np.round(MARKER_MM / np.array(case.spacing))).astype(int)
        shape = np.array(case.image.shape)
        lo = (shape * 0.3).astype(int)
        hi = np.maximum(lo + 1, (shape * 0.7).astype(int) - side)
        corner = np.array([rng.integers(a, b) for a, b in zip(lo, hi, strict=True)])
        box = tuple(slice(c, c + s) for c, s in zip(corner, side, strict=True))
        label = int(rng.choice([2, 3]))
        grid = np.indices(tuple(side)).sum(0) % 2  # texture no organ has
        case.image[box] = MARKER_HU + 120.0 * grid
        case.label[box] = label
        marker = np.zeros_like(case.label)
        marker[box] = label
        d = out_dir / f"{CANARY_PREFIX}{i:05d}"
        d.mkdir(parents=True, exist_ok=True)
        _save_nifti(d / "imaging.nii.gz", case.image, case.affine)
        _save_nifti(d / "segmentation.nii.gz", case.label, case.affine)
        _save_nifti(d / MARKER_NAME, marker, case.affine)
        dirs.append(d)
    return dirs


def prepare_canary_sites(site_paths: list[Path], n: int, run_dir: Path) -> list[Path]:
    """Write the canaries and the audited site's YAML; return the site list to
    simulate (the first site replaced by its audited copy).

    Raises
    ------
    ValueError
        If ``n`` is below 4 or the first site is not a KiTS-layout phantom site.
    """
    from sim.phantoms.sites import write_site_phantom

    if n < 4:
        raise ValueError(f"--audit-canaries needs at least 4 canaries, got {n}")
    site = load_site_config(site_paths[0])
    if site.data.layout not in ("kits23", "kits21", "auto"):
        raise ValueError(
            f"{site.source}: canary audits need a KiTS-layout site, not "
            f"{site.data.layout}"
        )
    write_site_phantom(site)  # the real cases must exist to be linked
    cases = load_site_cases(site)
    audit = Path(run_dir) / AUDIT_DIR
    if (audit / "canaries.json").exists():
        raise ValueError(
            f"{run_dir} already has audit canaries; a canary audit needs a fresh "
            "run (a new --run-name, no --resume): its coins must be drawn once"
        )
    canaries = write_canaries(site, n, audit / "canaries")
    included = inclusion_coins(n)
    root = audit / "data" / site.name
    root.mkdir(parents=True, exist_ok=True)
    for c in [*cases.train, *cases.validation]:
        link = root / c.case_id
        if not link.exists():
            link.symlink_to(c.image.parent.resolve(), target_is_directory=True)
    in_ids = [d.name for d, keep in zip(canaries, included, strict=True) if keep]
    for cid in in_ids:
        link = root / cid
        if not link.exists():
            link.symlink_to((audit / "canaries" / cid).resolve())
    doc = site.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc.pop("phantom", None)  # the simulation must not write phantoms here
    doc["data"].update(
        root=str(root.resolve()),
        layout="kits23",
        train_cases=[c.case_id for c in cases.train] + in_ids,
        validation_cases=[c.case_id for c in cases.validation],
    )
    doc["state_dir"] = str((audit / "state" / site.name).resolve())
    site_yaml = audit / f"{site.name}.yaml"
    site_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))
    secret = {
        "site": site.name,
        "source": str(site.source),
        "canaries": [d.name for d in canaries],
        "included": [bool(b) for b in included],
        "delta": site.privacy.delta,
    }
    (audit / "canaries.json").write_text(json.dumps(secret, indent=1) + "\n")
    log.info(
        "audit: %d canaries written, %d included at site %s",
        n,
        len(in_ids),
        site.name,
    )
    return [site_yaml, *[Path(p) for p in site_paths[1:]]]


@torch.no_grad()
def marker_losses(
    model: torch.nn.Module, canaries: list[Path], plan: Any
) -> np.ndarray:
    """Cross-entropy of the model's prediction on each canary's marker voxels."""
    from monai.inferers import sliding_window_inference

    prep = preprocessing(plan)
    model.eval()
    out = []
    for d in canaries:
        item = prep({IMAGE: str(d / "imaging.nii.gz"), LABEL: str(d / MARKER_NAME)})
        logits = sliding_window_inference(
            item[IMAGE].unsqueeze(0), plan.patch_size, 16, model, overlap=0.25
        )
        marker = item[LABEL][0].long()
        mask = marker > 0
        logp = torch.log_softmax(logits[0], 0)
        if not mask.any():
            out.append(math.nan)
            continue
        picked = logp.gather(0, marker.unsqueeze(0))[0][mask]
        out.append(float(-picked.mean()))
    return np.array(out, dtype=float)


def finish_canary_audit(run_dir: Path, confidence: float = 0.95) -> Path:
    """Score the canaries with the run's final model; write ``privacy-audit.json``.

    Returns
    -------
    Path
        ``runs/<run>/privacy-audit.json``.
    """
    from client.predict import load_model

    run_dir = Path(run_dir)
    audit = run_dir / AUDIT_DIR
    secret = json.loads((audit / "canaries.json").read_text())
    model, plan, _ = load_model(run_dir / "final")
    dirs = [audit / "canaries" / c for c in secret["canaries"]]
    losses = marker_losses(model, dirs, plan)
    included = np.array(secret["included"], dtype=bool)
    scores = -np.nan_to_num(losses, nan=float(np.nanmax(losses)))
    delta = secret["delta"] or 1e-5
    guess = best_guess_bound(scores, included, delta, confidence)
    auc, se = attack_auc(scores[included], scores[~included])
    latest = run_dir / "checkpoints" / "latest.json"
    eps = None
    if latest.is_file():
        eps = (json.loads(latest.read_text()).get("epsilon_per_site") or {}).get(
            secret["site"]
        )
    result = {
        "mode": "black-box",
        "site": secret["site"],
        "canaries": len(dirs),
        "included": int(included.sum()),
        "score": "minus the cross-entropy on the canary's marker",
        "auc": auc,
        "auc_ci95": [max(0.0, auc - 1.96 * se), min(1.0, auc + 1.96 * se)],
        "guesses": guess.k_pos + guess.k_neg,
        "correct": guess.correct,
        "epsilon_lb": guess.epsilon_lb,
        "confidence": confidence,
        "delta": delta,
        "accountant_epsilon": eps,
    }
    path = run_dir / RESULT_NAME
    path.write_text(json.dumps(result, indent=2) + "\n")
    log.info(
        "canary audit: %d/%d correct, epsilon >= %.3f (accountant %s)",
        guess.correct,
        guess.k_pos + guess.k_neg,
        guess.epsilon_lb,
        eps,
    )
    return path


def format_canary_audit(result: dict[str, Any]) -> str:
    """One paragraph for the terminal."""
    eps = result["accountant_epsilon"]
    claimed = f"{eps:.3f}" if eps is not None else "not recorded"
    return (
        f"privacy audit ({result['mode']}, site {result['site']}): "
        f"{result['canaries']} canaries, {result['included']} trained on; "
        f"{result['correct']}/{result['guesses']} guesses correct, AUC "
        f"{result['auc']:.3f}; epsilon >= {result['epsilon_lb']:.3f} at "
        f"{result['confidence']:.0%} confidence vs the accountant's {claimed}"
    )
