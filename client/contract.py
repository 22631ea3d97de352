"""The reply wire contract: what may leave the site, checked before it does.

A reply may hold only

- the model's arrays, each with a name, shape and dtype of the network the plan
  names (``common.task_models.build_plan_model``); a subset is allowed (FedBN keeps
  normalisation layers at home), an extra or reshaped array is not;
- metrics whose keys are listed for the message type in ``common.wire``
  (``REPLY_METRICS``, ``REPLY_LIST_METRICS``, ``TASK_METRIC_PATTERNS``), as
  scalars, or finite lists of the fixed length listed there;
- the ``site`` record with the site's own name and, for a refusal, a reason
  that names no path, file or case.

Plain Python on a :class:`ReplyView`, so it is tested without a federation; the
Flower side (``client/gate.py``) builds the view from a ``Message``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache

from common import wire
from common.config import Plan

ArraySpec = tuple[tuple[int, ...], str]

# A refusal reason must not look like a path, a file or a case identifier.
_LEAKY = (
    (re.compile(r"[/\\]"), "a path separator"),
    (
        re.compile(r"\.(nii|gz|nrrd|mha|dcm|csv|json|ya?ml|npy|npz|pt)\b", re.I),
        "a file",
    ),
    (re.compile(r"\bcase[_-]?\d+", re.I), "a case identifier"),
)


@dataclass(frozen=True)
class ReplyView:
    """What a reply would send, without the values of its arrays.

    ``records`` maps each record name to its kind (``arrays``, ``metrics`` or
    ``config``); ``arrays`` maps array names to (shape, dtype).
    """

    message_type: str
    records: dict[str, str]
    arrays: dict[str, ArraySpec] = field(default_factory=dict)
    metrics: dict[str, object] = field(default_factory=dict)
    site: dict[str, object] = field(default_factory=dict)
    is_error: bool = False
    nbytes: int = 0


_BUILD: list = []  # common.task_models.build_plan_model, imported on first use


@lru_cache(maxsize=8)
def _expected(
    task: str, model: str, seed: int, class_names: tuple[str, ...]
) -> tuple[tuple[str, ArraySpec], ...]:
    if not _BUILD:  # torch and MONAI load late; bound once (see client/gate.py)
        from common.task_models import build_plan_model

        _BUILD.append(build_plan_model)
    build_plan_model = _BUILD[0]
    plan = Plan.model_validate(
        {"task": task, "model": model, "seed": seed, "class-names": class_names}
    )
    state = build_plan_model(plan).state_dict()
    return tuple(
        (k, (tuple(int(s) for s in v.shape), str(v.dtype).removeprefix("torch.")))
        for k, v in state.items()
    )


def expected_arrays(plan: Plan) -> dict[str, ArraySpec]:
    """Names, shapes and dtypes of the plan's network (cached per model)."""
    return dict(_expected(plan.task, plan.model, plan.seed, plan.class_names))


def leaks(text: str) -> str | None:
    """What in ``text`` could identify data at the site, or None."""
    for pattern, what in _LEAKY:
        if pattern.search(text):
            return what
    return None


def allowed_metric(key: str, message_type: str, task: str) -> bool:
    """Whether ``key`` is on the contract's list for this message type."""
    if key in wire.REPLY_METRICS.get(message_type, wire.REFUSAL_METRICS):
        return True
    if key in wire.REPLY_LIST_METRICS.get(message_type, {}):
        return True
    # Evaluate replies, and fine-tune replies ("train.finetune"), carry task metrics.
    if message_type in (wire.MSG_EVALUATE, wire.MSG_TRAIN):
        return any(
            re.fullmatch(p, key) for p in wire.TASK_METRIC_PATTERNS.get(task, ())
        )
    return False


def max_metric_keys(message_type: str, task: str, n_classes: int) -> int:
    """The most metric keys a reply of this type may carry.

    The fixed keys of the message type plus the task's metrics: two per KiTS
    region for segmentation (Dice and surface Dice), accuracy, balanced
    accuracy, AUC, a recall per class and a confusion count per pair of classes
    for classification.
    """
    mtype = message_type.split(".")[0]
    fixed = len(wire.REPLY_METRICS.get(mtype, wire.REFUSAL_METRICS))
    fixed += len(wire.REPLY_LIST_METRICS.get(mtype, {}))
    if mtype not in (wire.MSG_EVALUATE, wire.MSG_TRAIN):
        return fixed
    # segmentation: six keys per region (Dice, surface Dice, two false-positive
    # figures, two case counts), eight regions at most
    per_task = 6 * 8 if task == "segmentation" else 3 + n_classes + n_classes**2
    return fixed + per_task


def check_reply(
    view: ReplyView,
    site_name: str,
    task: str,
    expected: dict[str, ArraySpec],
    n_classes: int = 4,
) -> list[str]:
    """Every way ``view`` breaks the contract (empty: it may be sent).

    The messages name keys and kinds, never values, so they can go into the
    audit log and a refusal reason.
    """
    if view.is_error:
        return []  # a Flower error carries only a code and our own reason
    mtype = view.message_type.split(".")[0]
    return [
        *_shape_problems(view, task, n_classes),
        *_array_problems(view, expected),
        *_metric_problems(view, mtype, task),
        *_site_problems(view, site_name),
    ]


def _shape_problems(view: ReplyView, task: str, n_classes: int) -> list[str]:
    """Records, arrays and metric counts the message type does not allow."""
    problems: list[str] = []
    known = {wire.ARRAYS: "arrays", wire.METRICS: "metrics", wire.SITE: "config"}
    for name, kind in view.records.items():
        if known.get(name) != kind:
            problems.append(f"record {name!r} ({kind}) is not in the contract")
    if view.arrays and view.message_type != wire.MSG_TRAIN:
        problems.append(f"arrays in a {view.message_type} reply")
    limit = max_metric_keys(view.message_type, task, n_classes)
    if len(view.metrics) > limit:
        problems.append(f"{len(view.metrics)} metric keys, at most {limit} allowed")
    if view.metrics.get(wire.DP_ENABLED) == 1:
        for key in wire.DP_TRAIN_METRICS_OMITTED & set(view.metrics):
            problems.append(f"metric {key!r} is not protected by DP; not sent")
    return problems


def _array_problems(view: ReplyView, expected: dict[str, ArraySpec]) -> list[str]:
    """Arrays that are not the plan model's parameters, in name, shape or dtype."""
    problems: list[str] = []
    for name, spec in view.arrays.items():
        if name not in expected:
            problems.append(f"array {name!r} is not a parameter of the plan's model")
        elif spec != expected[name]:
            problems.append(
                f"array {name!r} is {spec[0]} {spec[1]}, the model's is "
                f"{expected[name][0]} {expected[name][1]}"
            )
    return problems


def _metric_problems(view: ReplyView, mtype: str, task: str) -> list[str]:
    """Metrics not allowed for the message type, or not finite numbers."""
    problems: list[str] = []
    lists = wire.REPLY_LIST_METRICS.get(mtype, {})
    for key, value in view.metrics.items():
        if not allowed_metric(key, mtype, task):
            problems.append(f"metric {key!r} is not allowed in a {mtype} reply")
        elif isinstance(value, list):
            if key not in lists or len(value) != lists[key]:
                problems.append(f"metric {key!r} is a list of {len(value)} values")
            elif not all(math.isfinite(float(v)) for v in value):
                problems.append(f"metric {key!r} has non-finite values")
        elif not isinstance(value, int | float) or isinstance(value, bool):
            problems.append(f"metric {key!r} is not a number")
    return problems


def _site_problems(view: ReplyView, site_name: str) -> list[str]:
    """Site record keys outside the contract, another site's name, a leak."""
    problems: list[str] = []
    for key, value in view.site.items():
        if key not in wire.REPLY_SITE_KEYS:
            problems.append(f"site record key {key!r} is not in the contract")
        elif not isinstance(value, str):
            problems.append(f"site record key {key!r} is not text")
        elif key == wire.SITE_NAME and value not in (site_name, "unknown"):
            problems.append("site record names another site")
        elif key == wire.REFUSAL_REASON and (what := leaks(value)):
            problems.append(f"refusal reason contains {what}")
        elif key == wire.REFUSAL_CODE and value not in wire.REFUSAL_CODES:
            problems.append("refusal code is not one of the contract's codes")
    return problems
