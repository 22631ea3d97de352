"""Baselines for a finished simulation: each site alone, and all data pooled.

What federated learning is compared with (issue 6). After a simulated run,
with the run's own plan and preprocessing:

- ``local``: every site trains alone, from the same initial weights (the
  plan's ``initial-checkpoint`` when it has one), with the same recipe, for the
  same local optimiser steps it ran in the federation (rounds x local epochs x
  its steps per epoch);
- ``pooled``: one model trains on all sites' training data together, for as
  many steps as all sites ran in the federation together;

and every model (the federated final model, each local model, the pooled model)
is evaluated on every site's validation split with the task's own evaluation.
The result is ``comparison.json`` beside the run:
``{"metric", "models", "sites", "values": {model: {site: {metric: value}}}}``.

DP: a site with ``privacy.enabled`` trains its local baseline with DP-SGD at
the plan's target epsilon, its own delta and its own sample rate, noise
calibrated over the baseline's steps; the pooled model uses DP-SGD if any site
does, at the smallest delta. Baselines are a simulation tool (pooling patient
data is what federated learning avoids), so they never write to a site's
privacy ledger. With FedBN, the federated model is evaluated at each site with
that site's own normalisation layers.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset

from client.local_state import overlay_local_norm
from client.privacy.accounting import calibrate_noise, poisson_schedule
from client.privacy.dpsgd import DPSpec
from client.tasks.base import TaskData
from client.tasks.registry import get_task
from client.train import local_train, select_device
from common.config import (
    Plan,
    SiteConfig,
    load_plan,
    load_site_config,
    privacy_run_id,
)
from common.models import get_model_spec
from common.task_models import HEADLINE_METRICS, build_plan_model
from common.weights import import_state

log = logging.getLogger(__name__)

KINDS = ("local", "pooled")
COMPARISON_FILE = "comparison.json"


def run_plan(run_dir: Path) -> Plan:
    """The plan the run used, with its federated preprocessing applied."""
    raw = json.loads((run_dir / "plan.json").read_text())
    prep_file = run_dir / "preprocessing.json"
    if prep_file.exists():
        prep = json.loads(prep_file.read_text())
        raw.update(
            {
                "spacing-mm": prep["spacing-mm"],
                "hu-window": prep["hu-window"],
                "patch-size": prep["patch-size"],
                "intensity-mean": float(prep["foreground-mean"]),
                "intensity-std": float(prep["foreground-std"]),
            }
        )
    return load_plan(raw, str(run_dir / "plan.json"))


def _dp(plan: Plan, sites: list[SiteConfig], n: int, steps: int) -> DPSpec | None:
    deltas = [s.privacy.delta for s in sites if s.privacy.enabled]
    if not deltas:
        return None
    q, _ = poisson_schedule(n, plan.batch_size)
    noise = calibrate_noise(plan.dp_target_epsilon, min(deltas), q, steps)
    mode = get_model_spec(plan.model).grad_sample_mode
    return DPSpec(noise, plan.dp_max_grad_norm, mode)


def _train(
    plan: Plan, dataset, n: int, steps: int, sites: list[SiteConfig], seed: int
) -> nn.Module:
    task = get_task(plan.task)
    model = build_plan_model(plan)
    if plan.initial_checkpoint:  # the federation's own start: a pretrained model
        from server.checkpoint import load_initial

        import_state(
            model, load_initial(plan.initial_checkpoint, plan.task, plan.model)[0]
        )
    _, per_epoch = poisson_schedule(n, plan.batch_size)
    local_train(
        model,
        dataset,
        task.loss(plan),
        epochs=-(-steps // per_epoch),
        batch_size=plan.batch_size,
        learning_rate=plan.learning_rate,
        optimizer=plan.optimizer,
        device=select_device(sites[0].device),
        seed=seed % 2**31,
        dp=_dp(plan, sites, n, steps),
        max_steps=steps,
        multiplicity=plan.augmentation_multiplicity,
        trainable=plan.trainable_parameters,
    )
    return model


def _seed_datasets(datasets: list[TaskData], seed: int) -> None:
    for i, d in enumerate(datasets):
        d.train.set_seed((seed + 7919 * i) % 2**31)


def run_baselines(
    site_paths: list[Path],
    run_dir: Path,
    final_state: dict[str, torch.Tensor],
    kinds: list[str] | None = None,
) -> Path:
    """Train the baselines of a finished run and write ``comparison.json``.

    ``final_state`` is the federation's final global model (the caller reads
    the run's checkpoint; sites never import the coordinator's code).

    Raises
    ------
    ValueError
        For an unknown baseline kind.
    """
    kinds = list(KINDS) if kinds is None else list(kinds)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; use local,pooled")
    plan = run_plan(run_dir)
    sites = [load_site_config(p) for p in site_paths]
    task = get_task(plan.task)
    data = [task.load_data(s, plan) for s in sites]
    # The same number of optimiser steps as the federation ran at each site.
    epochs = plan.num_server_rounds * plan.local_epochs
    steps = [poisson_schedule(d.n_train, plan.batch_size)[1] * epochs for d in data]

    models: dict[str, tuple[nn.Module | dict, str]] = {}
    models["federated"] = (final_state, "state")
    budget: dict[str, dict] = {}
    if "local" in kinds:
        for site, d, n_steps in zip(sites, data, steps, strict=True):
            seed = plan.seed * 1_000_003 + zlib.crc32(site.name.encode())
            _seed_datasets([d], seed)
            log.info("local baseline %s: %d steps", site.name, n_steps)
            model = _train(plan, d.train, d.n_train, n_steps, [site], seed)
            models[f"local-{site.name}"] = (model, "model")
            budget[f"local-{site.name}"] = {"steps": n_steps, "cases": d.n_train}
    if "pooled" in kinds:
        pooled = ConcatDataset([d.train for d in data])
        n = sum(d.n_train for d in data)
        _seed_datasets(data, plan.seed)
        log.info("pooled baseline: %d cases, %d steps", n, sum(steps))
        models["pooled"] = (
            _train(plan, pooled, n, sum(steps), sites, plan.seed),
            "model",
        )
        budget["pooled"] = {"steps": sum(steps), "cases": n}

    values: dict[str, dict[str, dict[str, float]]] = {}
    for name, (obj, kind) in models.items():
        values[name] = {}
        for site, d in zip(sites, data, strict=True):
            model = obj if kind == "model" else _federated(plan, obj, site, run_dir)
            device = select_device(site.device)
            values[name][site.name] = _finite(task.evaluate(model, d, plan, device))
    out = {
        "metric": HEADLINE_METRICS[plan.task][0],
        "models": list(models),
        "sites": [s.name for s in sites],
        "values": values,
    }
    path = run_dir / COMPARISON_FILE
    path.write_text(json.dumps(out, indent=2))
    (run_dir / "baselines.json").write_text(
        json.dumps({"budget": budget, "dp": any(s.privacy.enabled for s in sites)})
    )
    log.info("comparison of %d models on %d sites: %s", len(models), len(sites), path)
    return path


def _federated(plan: Plan, state: dict, site: SiteConfig, run_dir: Path) -> nn.Module:
    model = build_plan_model(plan)
    if plan.fedbn:
        # the sites keep their layers under the run id they account under
        state = overlay_local_norm(state, site, privacy_run_id(run_dir.name, plan))
    import_state(model, state)
    return model


def _finite(values: dict[str, float]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and torch.isfinite(torch.tensor(float(v)))
    }
