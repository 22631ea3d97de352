"""The reply wire contract, checked where a reply leaves a site and again where
it reaches the coordinator.

A reply may hold only

- the model's arrays, each with a name, shape and dtype of the network the plan
  names (``common.task_models.build_plan_model``); a subset is allowed (FedBN keeps
  normalisation layers at home), an extra or reshaped array is not;
- metrics whose keys are listed for the message type in ``common.wire``
  (``REPLY_METRICS``, ``REPLY_LIST_METRICS``, ``TASK_METRIC_PATTERNS``), as
  scalars, or finite lists of the fixed length listed there;
- the ``site`` record with the site's own name and, for a refusal, a reason
  that names no path, file or case.

The site applies :func:`check_reply` before anything leaves (``client/gate.py``).
A hostile site skips that, so the coordinator applies the same check and more
(:func:`check_received`): the records a message type must carry, bounded key
counts and text lengths, and values it can use. Every count a weighted mean
uses is a whole number of patients in ``[0, max-site-examples]``
(:func:`value_problems`), and :func:`common.shares.capped_shares` bounds what
any claim can buy. The problems name keys and kinds, never values.

Plain Python on a :class:`ReplyView`, so it is tested without a federation; the
Flower sides (``client/gate.py``, ``server/strategy/replies.py``) build the view
from a ``Message``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from common import wire
from common.config import MAX_SURVIVAL_HORIZONS, MAX_SURVIVAL_INTERVALS, Plan

ArraySpec = tuple[tuple[int, ...], str]

# Bounds on what any reply may carry: a site name as the site YAML allows it
# (common/site_config.py), metric keys and texts no report needs longer.
SITE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_KEY_LENGTH = 128
MAX_TEXT_LENGTH = 2000
DEFAULT_MAX_EXAMPLES = int(Plan.model_fields["max_site_examples"].default)

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
    ``config``; the coordinator's view says ``other`` for anything else);
    ``arrays`` maps array names to (shape, dtype).
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


def _patterns(task: str | None) -> tuple[str, ...]:
    if task is None:  # a coordinator without a plan: either task's metrics
        return tuple(p for ps in wire.TASK_METRIC_PATTERNS.values() for p in ps)
    return tuple(wire.TASK_METRIC_PATTERNS.get(task, ()))


def allowed_metric(key: str, message_type: str, task: str | None) -> bool:
    """Whether ``key`` is on the contract's list for this message type
    (``task`` None: either task's metrics)."""
    if key in wire.REPLY_METRICS.get(message_type, wire.REFUSAL_METRICS):
        return True
    if key in wire.REPLY_LIST_METRICS.get(message_type, {}):
        return True
    # Evaluate replies, and fine-tune replies ("train.finetune"), carry task metrics.
    if message_type in (wire.MSG_EVALUATE, wire.MSG_TRAIN):
        return any(re.fullmatch(p, key) for p in _patterns(task))
    return False


MAX_CANDIDATES = 16  # post-processing candidates a reply may carry metrics for
MAX_SUBGROUPS = 32  # subgroups (attribute, value) a reply may carry metrics for
MAX_INTERVALS = MAX_SURVIVAL_INTERVALS  # prognosis: the plan's edges, at most
MAX_HORIZONS = MAX_SURVIVAL_HORIZONS


def max_metric_keys(message_type: str, task: str | None, n_classes: int) -> int:
    """The most metric keys a reply of this type may carry.

    The fixed keys of the message type plus the task's metrics: two per KiTS
    region for segmentation (Dice and surface Dice), accuracy, balanced
    accuracy, AUC, a recall per class and a confusion count per pair of classes
    for classification. ``task`` None: the larger of the two.
    """
    if task is None:
        return max(
            max_metric_keys(message_type, t, n_classes)
            for t in wire.TASK_METRIC_PATTERNS
        )
    mtype = message_type.split(".")[0]
    fixed = len(wire.REPLY_METRICS.get(mtype, wire.REFUSAL_METRICS))
    fixed += len(wire.REPLY_LIST_METRICS.get(mtype, {}))
    if mtype not in (wire.MSG_EVALUATE, wire.MSG_TRAIN):
        return fixed
    # segmentation: six keys per region (Dice, surface Dice, two false-positive
    # figures, two case counts), eight regions at most; six lesion-level keys per
    # lesion region, four at most; five keys per post-processing candidate
    # (common.postprocess.CANDIDATES, at most MAX_CANDIDATES)
    if task == "segmentation":
        per_task = 6 * 8 + 6 * 4 + 5 * MAX_CANDIDATES + 9 * MAX_SUBGROUPS
    elif task == "prognosis":
        # three scores, two per horizon and one td-AUC per horizon, two
        # counts; two life-table counts per risk group and interval
        per_task = 3 + 3 * MAX_HORIZONS + 2 + 4 * MAX_INTERVALS
    else:
        per_task = 3 + n_classes + n_classes**2
    return fixed + per_task


def check_reply(
    view: ReplyView,
    site_name: str,
    task: str | None,
    expected: dict[str, ArraySpec] | None,
    n_classes: int = 4,
    *,
    site_privacy: bool = True,
) -> list[str]:
    """Every way ``view`` breaks the contract (empty: it may be sent).

    The messages name keys and kinds, never values, so they can go into the
    audit log and a refusal reason. ``expected`` None leaves the arrays to the
    caller (the coordinator's update guard holds them to the global model it
    sent). ``site_privacy`` False leaves out the rule that protects the site's
    own patients (no train-loss under DP): the coordinator does not reject a
    reply for what the site chose to disclose.
    """
    if view.is_error:
        return []  # a Flower error carries only a code and our own reason
    mtype = view.message_type.split(".")[0]
    return [
        *_shape_problems(view, task, n_classes, site_privacy),
        *(_array_problems(view, expected) if expected is not None else []),
        *_metric_problems(view, mtype, task),
        *_site_problems(view, site_name),
    ]


def _shape_problems(
    view: ReplyView, task: str | None, n_classes: int, site_privacy: bool = True
) -> list[str]:
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
    if site_privacy and view.metrics.get(wire.DP_ENABLED) == 1:
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


def _metric_problems(view: ReplyView, mtype: str, task: str | None) -> list[str]:
    """Metrics not allowed for the message type, or not finite numbers."""
    problems: list[str] = []
    lists = wire.REPLY_LIST_METRICS.get(mtype, {})
    for key, value in view.metrics.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH:
            problems.append(f"a metric key is longer than {MAX_KEY_LENGTH} characters")
        elif not allowed_metric(key, mtype, task):
            problems.append(f"metric {key!r} is not allowed in a {mtype} reply")
        elif isinstance(value, list):
            if key not in lists or len(value) != lists[key]:
                problems.append(f"metric {key!r} is a list of {len(value)} values")
            elif not all(_is_number(v) and math.isfinite(v) for v in value):
                problems.append(f"metric {key!r} has non-finite values")
        elif not _is_number(value):
            problems.append(f"metric {key!r} is not a number")
    return problems


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _site_problems(view: ReplyView, site_name: str) -> list[str]:
    """Site record keys outside the contract, another site's name, a leak."""
    problems: list[str] = []
    for key, value in view.site.items():
        if key not in wire.REPLY_SITE_KEYS:
            problems.append(f"site record key {key!r} is not in the contract")
        elif not isinstance(value, str):
            problems.append(f"site record key {key!r} is not text")
        elif len(value) > MAX_TEXT_LENGTH:
            problems.append(f"site record {key!r} is over {MAX_TEXT_LENGTH} characters")
        elif key == wire.SITE_NAME and value not in (site_name, "unknown"):
            problems.append("site record names another site")
        elif key == wire.REFUSAL_REASON and (what := leaks(value)):
            problems.append(f"refusal reason contains {what}")
        elif key == wire.REFUSAL_CODE and value not in wire.REFUSAL_CODES:
            problems.append("refusal code is not one of the contract's codes")
    return problems


# -- the coordinator's side: what it may use of a reply --------------------------
@dataclass(frozen=True)
class ReplyRules:
    """What the coordinator accepts in a reply, from the plan.

    ``task`` None (a coordinator built without a plan, in tests) accepts either
    task's metric keys; every other rule applies in full.
    """

    task: str | None = None
    n_classes: int = 4
    max_examples: int = DEFAULT_MAX_EXAMPLES

    @classmethod
    def from_plan(cls, plan: Plan) -> ReplyRules:
        """The plan's task, class count and ``max-site-examples``."""
        return cls(plan.task, len(plan.class_names), plan.max_site_examples)


# Whole numbers of patients: the weights of every case-weighted mean
# (num-examples, num-val-cases, cases-<region>, cases-no-<region>, the
# fingerprint's n-cases) and the confusion counts.
_COUNT_KEYS = frozenset(
    {wire.NUM_EXAMPLES, wire.NUM_VAL_CASES, wire.FP_N_CASES, wire.OOD_N}
)
_COUNT = re.compile(
    r"(?:sg-[a-z]+-[a-z0-9_]{1,24}-)?cases-(no-)?[a-z]+|cm-[a-z0-9_]+-[a-z0-9_]+"
    rf"|{wire.ATRISK_KEY.pattern}|{wire.KM_EVENTS_KEY.pattern}"
)
_FLAGS = frozenset(
    {
        wire.REFUSED,
        wire.DP_ENABLED,
        wire.METRICS_WITHHELD,
        wire.FINE_TUNED,
        wire.DATA_SYNTHETIC,
    }
)
# Scores that are shares: NaN (undefined at the site) or in [0, 1].
_UNIT = re.compile(
    r"(surface-)?dice-[a-z]+|fp-rate-[a-z]+|accuracy|balanced-accuracy"
    r"|auc-macro|recall-[a-z0-9_]+"
    r"|(?:lesion-sens|detect-sens|detect-spec|detect-auc|froc)-[a-z]+"
    r"|pp[0-9]{1,2}-(?:dice|fp-rate|lesion-sens)-[a-z]+"
    r"|sg-[a-z]+-[a-z0-9_]{1,24}-(?:dice2?|fp-rate|lesion-sens)-[a-z]+"
    r"|c-harrell|c-uno|(?:td-auc|cal-pred|cal-obs)-[0-9]{1,5}"
)
# False-positive lesions per case: not NaN, from 0 to a bound no scan reaches.
_PER_CASE = re.compile(r"(?:pp[0-9]{1,2}-)?fp-lesions-[a-z]+")
MAX_FP_LESIONS = 10_000.0
# Privacy figures: not NaN, not negative (epsilon is infinite without DP);
# the integrated Brier score, whose censoring weights can take it past 1.
_NON_NEGATIVE = frozenset({wire.EPSILON, wire.DELTA, wire.NOISE_MULTIPLIER, wire.IBS})
# Fingerprint lists: spacing in mm and extents in mm (at most 100 mm voxels,
# 10 m scans), voxels per bin and label mL (per case at most 2^31 voxels and
# 100 L, times max-site-examples).
_LIST_BOUNDS = {
    wire.FP_SPACING_Q: 100.0,
    wire.FP_EXTENT: 10_000.0,
    wire.FP_HIST: float(2**31),
    wire.FP_LABEL_ML: 100_000.0,
}


def is_case_count(value: object, max_examples: int) -> bool:
    """Whether ``value`` is a whole number of patients in ``[0, max_examples]``."""
    if not _is_number(value):
        return False
    v = float(value)  # type: ignore[arg-type]
    return math.isfinite(v) and v == math.floor(v) and 0 <= v <= max_examples


def value_problems(metrics: Mapping[str, object], max_examples: int) -> list[str]:
    """Metric values the coordinator cannot use, by key (keys on the contract's
    list only; the others are :func:`check_reply`'s problems).

    Counts are whole numbers in ``[0, max_examples]``, flags 0 or 1, shares NaN
    or in ``[0, 1]``, privacy figures not NaN and not negative, fingerprint
    lists in their physical ranges (per case, times ``max_examples``).
    """
    problems: list[str] = []
    for key, value in metrics.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH:
            continue
        if key in _COUNT_KEYS or _COUNT.fullmatch(key):
            if not is_case_count(value, max_examples):
                problems.append(
                    f"metric {key!r} is not a whole number of patients in "
                    f"[0, {max_examples}] (max-site-examples)"
                )
        elif key in _FLAGS:
            if value not in (0, 1) or isinstance(value, bool):
                problems.append(f"metric {key!r} is not 0 or 1")
        elif _UNIT.fullmatch(key):
            if _is_number(value) and not (
                math.isnan(value) or 0 <= value <= 1  # type: ignore[arg-type]
            ):
                problems.append(f"metric {key!r} is not NaN or in [0, 1]")
        elif _PER_CASE.fullmatch(key):
            if _is_number(value) and not 0 <= value <= MAX_FP_LESIONS:  # type: ignore[operator]
                problems.append(f"metric {key!r} is not in [0, {MAX_FP_LESIONS:g}]")
        elif key == wire.OOD_EXCEED and isinstance(value, list):
            if not all(_is_number(v) and 0 <= v <= 1 for v in value):
                problems.append(f"metric {key!r} has shares outside [0, 1]")
        elif key in (wire.OOD_SUM, wire.OOD_SUMSQ) and isinstance(value, list):
            if not all(_is_number(v) and math.isfinite(v) for v in value):
                problems.append(f"metric {key!r} has values that are not finite")
        elif key in _NON_NEGATIVE:
            if _is_number(value) and not value >= 0:  # type: ignore[operator]
                problems.append(f"metric {key!r} is NaN or negative")
        elif key in _LIST_BOUNDS and isinstance(value, list):
            top = _LIST_BOUNDS[key]
            top *= 1 if key in (wire.FP_SPACING_Q, wire.FP_EXTENT) else max_examples
            if not all(_is_number(v) and 0 <= v <= top for v in value):
                problems.append(f"metric {key!r} has values outside [0, {top:g}]")
    n_cases = metrics.get(wire.FP_N_CASES)
    if _is_number(n_cases) and n_cases > 0:  # type: ignore[operator]
        # a scan of some cases has a spacing and an extent (the plan divides)
        for key in (wire.FP_SPACING_Q, wire.FP_EXTENT):
            value = metrics.get(key)
            if isinstance(value, list) and not all(
                _is_number(v) and v > 0 for v in value
            ):
                problems.append(f"metric {key!r} is not positive for n-cases > 0")
    return problems


def _required(message_type: str, refused: bool) -> dict[str, str]:
    """The records a reply of this type must carry, exactly."""
    need = {wire.METRICS: "metrics", wire.SITE: "config"}
    if message_type == wire.MSG_TRAIN and not refused:
        need[wire.ARRAYS] = "arrays"
    return need


def check_received(view: ReplyView, site_name: str, rules: ReplyRules) -> list[str]:
    """Every reason the coordinator cannot use ``view`` (empty: it may).

    :func:`check_reply` without the site's own privacy rule (and without the
    arrays, which the update guard holds to the global model sent: names,
    shapes, dtypes, finite values), after bounds that
    are checked first, so that a reply with ten thousand keys costs no more
    than one with ten: exactly the records the message type carries (a train
    update: one array record, one metric record and the site record; a
    refusal or any other reply: the metric and site records), at most
    :func:`max_metric_keys` metric keys. Then :func:`value_problems`, and a
    train update must claim at least one training case.
    """
    if view.is_error:
        return []
    refused = view.metrics.get(wire.REFUSED) == 1
    need = _required(view.message_type, refused)
    if view.records != need:
        return [
            "records are not exactly "
            + ", ".join(f"{k} ({v})" for k, v in sorted(need.items()))
        ]
    limit = max_metric_keys(view.message_type, rules.task, rules.n_classes)
    if len(view.metrics) > limit or len(view.site) > len(wire.REPLY_SITE_KEYS):
        return [f"more than {limit} metric keys or 3 site record keys"]
    problems = check_reply(
        view, site_name, rules.task, None, rules.n_classes, site_privacy=False
    )
    problems += value_problems(view.metrics, rules.max_examples)
    if view.message_type == wire.MSG_TRAIN and not refused:
        n = view.metrics.get(wire.NUM_EXAMPLES)
        if not (_is_number(n) and n >= 1):  # type: ignore[operator]
            problems.append("num-examples is missing or not a positive number of cases")
    return problems


def declared_name(value: object) -> str | None:
    """A site's declared name if it is one a site YAML allows, else None."""
    if isinstance(value, str) and SITE_NAME_PATTERN.fullmatch(value):
        return value
    return None


def safe_text(text: object, limit: int = 200) -> str:
    """``text`` as printable ASCII of at most ``limit`` characters.

    Control characters (terminal escape codes among them) and non-ASCII become
    Python escapes (``\\x1b``), so a site's text reaches no terminal, log or
    report as it was sent.
    """
    out = "".join(
        c if " " <= c <= "~" else c.encode("unicode_escape").decode("ascii")
        for c in str(text)[: limit + 1]
    )
    return out if len(out) <= limit else out[: max(0, limit - 3)] + "..."
