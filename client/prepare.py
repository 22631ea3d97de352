"""One preparation step for every request a site answers.

Train, fine-tune, evaluate and the fingerprint query all start the same way:
read the plan (with the federated preprocessing plan when the coordinator
sends one), find and validate the site YAML, and, for the three model
requests, load the task's data, build the plan's model and load the global
weights into it, with the site's own normalisation layers under FedBN. This
module does that once: :func:`setup` for every request, :func:`prepare` for
the model requests, which hands back a :class:`Round`.
Flower-free: ``client/app.py`` turns a Flower message into a :class:`Request`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.local_state import overlay_local_norm
from client.request_guard import (
    TRAIN,
    Checked,
    QueryCounter,
    check_request,
    refuse,
)
from client.request_refused import RequestRefused
from client.tasks.base import Task, TaskData
from client.tasks.registry import get_task
from client.tasks.segmentation.pipeline import require_modality
from client.train import select_device
from common import wire
from common.config import ConfigError, Plan, SiteConfig, load_plan, load_site_config
from common.logs import setup_logging
from common.norm_layers import require_norm_params
from common.task_models import build_plan_model
from common.weights import import_state

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Request:
    """What a request brings, without Flower's types.

    ``config`` is the message's ``config`` record (None when it has none);
    ``global_weights`` unpacks the model it carries, only when called, so a
    request is checked in the same order whatever it carries.
    """

    kind: str
    run_config: Mapping[str, Any]
    node_config: Mapping[str, Any]
    run_id: int | str
    config: Mapping[str, Any] | None
    global_weights: Callable[[], StateDict]


@dataclass(frozen=True)
class Reply:
    """What a site answers: its name, metrics and, for a train round, the update."""

    site: str
    metrics: dict[str, Any]
    state: Mapping[str, torch.Tensor] | None = None


@dataclass
class Setup:
    """What every request needs first: the plan, the site's validated YAML and
    the request's values as the site checked them (:mod:`client.request_guard`)."""

    request: Request
    plan: Plan
    site: SiteConfig
    checked: Checked

    @property
    def config(self) -> Mapping[str, Any]:
        """The request's config record (checked to exist by :func:`setup`)."""
        if self.request.config is None:
            raise KeyError(wire.CONFIG)
        return self.request.config

    @property
    def run_id(self) -> str:
        """The coordinator's run id, checked to be a short plain name."""
        return self.checked.run_id

    @functools.cached_property
    def device(self) -> torch.device:
        """The site's device, resolved when first needed."""
        return select_device(self.site.device)


@dataclass
class Round(Setup):
    """A model request, prepared: the task's data and the global model loaded.

    ``received`` is the global state as it came; ``norm`` the FedBN keys that
    stay at the site (empty without FedBN or outside training).
    """

    number: int
    task: Task
    data: TaskData
    model: nn.Module
    received: StateDict
    norm: list[str]
    load_s: float


def site_config_path(node_config: Mapping[str, Any], plan: Plan | None) -> Path:
    """Deployment: ``site-config`` node config. Simulation: one YAML per partition
    (from the plan; without a valid plan a simulated site cannot be found)."""
    if "site-config" in node_config:
        return Path(str(node_config["site-config"]))
    paths = plan.site_config_paths if plan is not None else []
    if "partition-id" in node_config and paths:
        return paths[int(node_config["partition-id"]) % len(paths)]
    raise ConfigError(
        "no site YAML: start the SuperNode with --node-config "
        "\"site-config='/path/to/site.yaml'\""
    )


def site_name(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> str:
    """The site's name for a refusal; ``unknown`` when the site cannot be read."""
    try:
        plan: Plan | None = load_plan(run_config)
    except Exception:  # noqa: BLE001 - a refused plan: the site YAML may still say
        plan = None
    try:
        return load_site_config(site_config_path(node_config, plan)).name
    except Exception:  # noqa: BLE001 - the refusal must still go out
        return "unknown"


def apply_cpu_threads(site: SiteConfig) -> None:
    """Limit torch to the site's ``cpu_threads`` (if set) for this process."""
    if site.cpu_threads is not None:
        torch.set_num_threads(site.cpu_threads)


def request_plan(request: Request) -> Plan:
    """The plan, with the federated preprocessing plan when the request has one.

    Both come from the coordinator: a value the plan's schema refuses (NaN,
    infinity, out of bounds, wrong type, an unknown key) refuses the request
    as ``request-invalid``, before anything else.
    """
    try:
        plan = load_plan(request.run_config)
    except ConfigError as exc:
        raise RequestRefused("request-invalid", f"the run config: {exc}") from None
    cfg = request.config or {}
    if wire.PREP_SPACING not in cfg:
        return plan
    try:
        prep = {
            "spacing-mm": _numbers(cfg, wire.PREP_SPACING, 3),
            "hu-window": _numbers(cfg, wire.PREP_WINDOW, 2),
            "patch-size": [int(v) for v in _numbers(cfg, wire.PREP_PATCH, 3)],
            "intensity-mean": _numbers(cfg, wire.PREP_MEAN, 0)[0],
            "intensity-std": _numbers(cfg, wire.PREP_STD, 0)[0],
        }
        return load_plan({**request.run_config, **prep})
    except ConfigError as exc:
        raise RequestRefused(
            "request-invalid", f"the preprocessing plan: {exc}"
        ) from None


def _numbers(cfg: Mapping[str, Any], key: str, n: int) -> list[float]:
    """``n`` finite numbers under ``key`` (``n`` = 0: one scalar)."""
    value = cfg.get(key)
    values = [value] if n == 0 else value
    if not isinstance(values, list) or len(values) != max(n, 1):
        raise refuse(key, value, f"must be {'a number' if n == 0 else f'{n} numbers'}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise refuse(key, value, "must hold numbers only")
        if not math.isfinite(v):
            raise refuse(key, value, "must hold finite numbers only")
    if key == wire.PREP_PATCH and any(float(v) != int(v) for v in values):
        raise refuse(key, value, "must hold whole numbers")
    return [float(v) for v in values]


def setup(request: Request) -> Setup:
    """The first step of every request: plan, site, and the request checked.

    The request's values are checked against the plan's bounds and the site's
    limits (:func:`client.request_guard.check_request`), and a release
    (evaluate, fine-tune, query) is counted against the run's allowance, before
    any data are read or any work is done.
    """
    setup_logging()
    plan = request_plan(request)
    site = load_site_config(site_config_path(request.node_config, plan))
    apply_cpu_threads(site)
    checked = check_request(request.kind, request.config, plan, site)
    if plan.task == "segmentation":  # a plan for the other modality: refused
        require_modality(site, plan)  # before any release is counted
    if request.kind != TRAIN:
        QueryCounter(site.state_dir).take(
            checked.run_id, site.privacy.max_queries_per_run
        )
    return Setup(request, plan, site, checked)


def prepare(
    request: Request, *, training: bool = False, default_round: int = 1
) -> Round:
    """:func:`setup`, then the task's data and the global model at this site.

    The one preparation of train, fine-tune and evaluate.

    Parameters
    ----------
    training : bool
        FedBN needs normalisation layers to keep at the site: a model without
        them is a configuration error before anything is trained.
    default_round : int
        The round number when the request names none.
    """
    s = setup(request)
    number = default_round if s.checked.round is None else s.checked.round
    task = get_task(s.plan.task)
    start = time.perf_counter()
    data = task.load_data(s.site, s.plan)
    load_s = time.perf_counter() - start
    model, received, norm = _global_model(s, training)
    return Round(
        request,
        s.plan,
        s.site,
        s.checked,
        number,
        task,
        data,
        model,
        received,
        norm,
        load_s,
    )


def _global_model(s: Setup, training: bool) -> tuple[nn.Module, StateDict, list[str]]:
    """The plan's model with the global weights (and the site's own norm layers)."""
    model = build_plan_model(s.plan)
    received = s.request.global_weights()
    norm = require_norm_params(model, s.plan.model) if s.plan.fedbn and training else []
    state = received
    if s.plan.fedbn:  # each site trains and evaluates with its own norm layers
        state = overlay_local_norm(received, s.site, s.run_id)
    import_state(model, state)
    return model, received, norm
