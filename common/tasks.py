"""What both sides need to know about a task: its network's output size, and
how a demo site's synthetic data are written.

Everything else a task owns (data, loss, metrics, prediction) lives in the
site's task plug-in (``client/task.py``); the federation code never branches on
the task.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from common import wire
from common.config import Plan, SiteConfig
from common.metrics import KITS_REGIONS
from common.models import NUM_SEG_CLASSES, build_model, get_model_spec

# Number of network outputs for a plan, per task.
TASK_OUTPUTS: dict[str, Callable[[Plan], int]] = {
    "segmentation": lambda plan: NUM_SEG_CLASSES,
    "classification": lambda plan: len(plan.class_names),
}

# The evaluation metrics a report leads with, per task (round line, summary).
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "segmentation": tuple(wire.dice_key(r) for r in KITS_REGIONS),
    "classification": (wire.BALANCED_ACCURACY, wire.ACCURACY, wire.AUC_MACRO),
}


def build_plan_model(plan: Plan) -> nn.Module:
    """The plan's network, identically initialised on every side.

    Raises
    ------
    ValueError
        If the model is registered for another task.
    """
    spec = get_model_spec(plan.model)
    if spec.task != plan.task:
        raise ValueError(
            f"model {plan.model!r} is a {spec.task} network but the plan's task is "
            f"{plan.task!r}; choose a {plan.task} model"
        )
    return build_model(plan.model, 1, TASK_OUTPUTS[plan.task](plan), seed=plan.seed)


def _segmentation_phantom(site: SiteConfig) -> None:
    from common.phantom import DEFAULT_SCALE, load_profile
    from common.phantom_io import write_site

    if site.phantom is None:
        return
    write_site(
        site.data.root,
        load_profile(site.phantom.profile),
        site.phantom.cases,
        seed=site.phantom.seed,
        scale=site.phantom.scale or DEFAULT_SCALE,
        # only ever replaces cases it generated itself (phantom.json present)
        overwrite=True,
    )


def _classification_phantom(site: SiteConfig) -> None:
    from common.phantom_cls import write_cls_site_from_config

    write_cls_site_from_config(site)


# Writers of a demo site's synthetic data, by the site YAML's ``phantom.task``.
PHANTOM_WRITERS: dict[str, Callable[[SiteConfig], None]] = {
    "segmentation": _segmentation_phantom,
    "classification": _classification_phantom,
}


def write_site_phantom(site: SiteConfig) -> None:
    """Write the synthetic cases a site YAML's ``phantom`` section asks for.

    Idempotent: complete cases written earlier with the same settings are kept.
    Does nothing for a site without a ``phantom`` section.
    """
    if site.phantom is not None:
        PHANTOM_WRITERS[site.phantom.task](site)
