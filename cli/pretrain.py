"""``kidneyfl pretrain``: a starting model from public data, trained centrally.

A consortium may start its federation from a model trained on a public dataset
(KiTS19/21/23, MSD Task 64 or nnU-Net raw, or any manifest) instead of random
weights. Public data need no differential privacy, so this trains without DP,
on one machine, with the plan's model and preprocessing; the plan key
``initial-checkpoint`` then starts a federation from the result. The dataset's
name and licence, and the weights' SHA-256, travel in every later checkpoint's
sidecar (``initial_checkpoint``), so anyone holding the final model knows what
it was built on.

The public dataset is described by a site-style YAML (``data.root``,
``data.layout``, ``state_dir`` for the preprocessing cache) with
``privacy.enabled: false``; a YAML with a ``phantom`` section (the demo's
stand-in for a public set, ``sites/public-phantoms.yaml``) gets its synthetic
cases written first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

log = logging.getLogger("kidneyfl.pretrain")

PRETRAINED_KEY = "pretrained"


def pretrain(
    data_yaml: Path,
    out_dir: Path,
    *,
    dataset: str,
    licence: str,
    steps: int,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Train the plan's model on a public dataset; returns the checkpoint folder.

    The folder (``out_dir``) holds ``round-0000.pt`` and ``latest.json`` in the
    checkpoint format of a federated run, with a ``pretrained`` entry (dataset,
    licence, steps, cases, validation metrics) in the sidecar.

    Raises
    ------
    ValueError
        If the YAML enables DP (public data are trained without it, and a
        site's ledger is no place for them), or ``steps`` is not positive.
    FileExistsError
        If ``out_dir`` already holds a checkpoint (nothing is overwritten).
    """
    from cli.progress import StepProgress
    from client.privacy.accounting import poisson_schedule
    from client.tasks.registry import get_task
    from client.train import local_train, select_device
    from common.config import load_plan, load_site_config
    from common.task_models import build_plan_model
    from server.checkpoint import LATEST, save_checkpoint
    from sim.runner import default_plan

    if steps < 1:
        raise ValueError("--steps must be at least 1")
    site = load_site_config(data_yaml)
    if site.privacy.enabled:
        raise ValueError(
            f"{data_yaml}: pretraining on public data runs without DP; set "
            "privacy.enabled: false in this YAML (it is not a hospital's site)"
        )
    if (out_dir / LATEST).exists():
        raise FileExistsError(
            f"{out_dir} already holds a checkpoint; choose another --out"
        )
    if site.phantom is not None:  # a synthetic stand-in for a public set (demo)
        from sim.phantoms.sites import write_site_phantom

        write_site_phantom(site)
    plan = load_plan({**default_plan(), **(overrides or {})}, "pretrain plan")
    task = get_task(plan.task)
    data = task.load_data(site, plan)
    model = build_plan_model(plan)
    device = select_device(site.device)
    _, per_epoch = poisson_schedule(data.n_train, plan.batch_size)
    data.train.set_seed(plan.seed)
    started = time.perf_counter()
    what = f"pretraining {plan.model} on {data.n_train} cases ({device.type})"
    with StepProgress(steps, what) as progress:
        stats = local_train(
            model,
            data.train,
            task.loss(plan),
            epochs=-(-steps // per_epoch),
            batch_size=plan.batch_size,
            learning_rate=plan.learning_rate,
            optimizer=plan.optimizer,
            device=device,
            seed=plan.seed,
            max_steps=steps,
            multiplicity=plan.augmentation_multiplicity,
            on_step=progress,
        )
    metrics = task.evaluate(model, data, plan, device) if data.n_val else {}
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    sidecar = {
        "plan": plan.model_dump(by_alias=True, mode="json"),
        "plan_fingerprint": json.loads(json.dumps(plan.fingerprint())),
        "model": plan.model,
        "metrics": metrics,
        "epsilon_per_site": {},
        PRETRAINED_KEY: {
            "dataset": dataset,
            "licence": licence,
            "steps": stats.steps,
            "train_cases": data.n_train,
            "validation_cases": data.n_val,
            "seconds": round(time.perf_counter() - started, 1),
            "dp": False,
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir, 0, state, sidecar)
    digest = hashlib.sha256((out_dir / "round-0000.pt").read_bytes()).hexdigest()
    log.info(
        "pretrained %s on %s: %s (sha256 %s)", plan.model, dataset, out_dir, digest
    )
    return out_dir


def _run(args: argparse.Namespace) -> int:
    from sim.cli import _parse_set

    out = pretrain(
        Path(args.data),
        Path(args.out),
        dataset=args.dataset,
        licence=args.licence,
        steps=args.steps,
        overrides=_parse_set(args.set or []),
    )
    meta = json.loads((out / "latest.json").read_text())
    print(f"pretrained model: {out}  (sha256 {meta['sha256'][:16]}...)")
    for key, value in sorted(meta.get("metrics", {}).items()):
        if key.startswith("dice-"):
            print(f"  validation {key}: {value:.3f}")
    print(f"start a federation from it: --set initial-checkpoint={out.resolve()}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``kidneyfl pretrain`` to the top-level parser."""
    p = sub.add_parser(
        "pretrain",
        help="train a starting model centrally, without DP, on a public dataset",
        description=__doc__.split("\n\n")[1],
        epilog="example: kidneyfl pretrain public/kits23.yaml --out "
        'runs/pretrain-kits23 --dataset "KiTS23" --licence "CC BY-NC-SA 4.0" '
        "--steps 2000",
        allow_abbrev=False,
    )
    p.add_argument("data", help="YAML describing the public dataset (site format)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--dataset", required=True, help="the dataset's name and version")
    p.add_argument("--licence", required=True, help="the dataset's licence")
    p.add_argument("--steps", type=int, default=500, help="optimiser steps")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a plan key of [tool.flwr.app.config] (model, patch, ...)",
    )
    p.set_defaults(func=_run)
