"""The site's one release rule for validation metrics: every released number
describes at least the site's floor of patients.

A validation metric is an aggregate the coordinator receives without DP noise,
so the site releases it only when the patients it is computed over (its
*denominator*) number at least the floor (``privacy.min_cases_for_aggregates``,
raised, never lowered, by the coordinator: ``client.evaluate_round``). The
whole validation set passing the floor is not enough: a region's Dice is a mean
over the cases that have the region, and at a site with one tumour patient
``dice-tumour`` *is* that patient's Dice.

Denominators, by key (:func:`denominator`):

- segmentation (``common.metrics.summarise_cases``; one case per patient):
  ``dice-X``, ``surface-dice-X`` and ``cases-X`` are over ``cases-X``;
  ``fp-rate-X``, ``fp-ml-X`` and ``cases-no-X`` over ``cases-no-X``.
- classification (``common.cls_metrics``): ``recall-c`` is over class ``c``'s
  validation patients, and so is the whole confusion row ``cm-c-*``. The row,
  not the cell, is the unit: its cells split one group of patients (class
  ``c``) by prediction, as ``fp-rate`` splits ``cases-no-X``. Withholding only
  the small cells would show which cells are small (1 to floor-1), and a
  withheld cell would come back as the row's total, which the other releases
  give, minus the released cells.
- ``balanced-accuracy``, ``auc-macro`` and ``accuracy`` are over every class
  present in validation (:data:`ALL_CLASSES`): released only when each class
  with validation patients has at least the floor. Balanced accuracy and macro
  AUC carry one term per class (balanced accuracy times the number of classes,
  minus the released recalls, is the withheld recall). Accuracy is over all
  validation cases, but accuracy times the validation count, minus the
  released rows' diagonals, is the withheld rows' correct count, which for one
  small class is its patients' outcome: so accuracy follows the same rule.
  They are withheld, not recomputed over the released classes, so that one
  key means one quantity at every site and in every round (the coordinator
  averages it across sites).
- lesion level (``common.lesions``): ``lesion-sens-X``, ``detect-sens-X`` and
  ``froc-X`` over ``cases-X``; ``detect-spec-X`` over ``cases-no-X``;
  ``fp-lesions-X`` over all validation cases; ``detect-auc-X`` over both
  groups, so released only when ``cases-X`` and ``cases-no-X`` each reach
  the floor (an AUC with one tumour-free patient ranks that patient).
- a post-processing candidate's metric ``pp<i>-<key>``: as ``<key>``.
- a subgroup's metric ``sg-<attr>-<value>-<key>``: as ``<key>``, over the
  group's own count (``sg-<attr>-<value>-cases-X``), so a group smaller than
  the floor is never released; ``dice2-X`` (mean squared Dice, for the
  coordinator's confidence interval) as ``dice-X``.
- prognosis (``common.survival_metrics``): ``c-harrell``, ``c-uno``, ``ibs``,
  ``td-auc-<days>``, ``cal-pred-<days>`` and ``cal-obs-<days>`` over
  :data:`SURVIVAL`, the smaller of the validation patients with an outcome
  (``cases-outcome``) and their events (``cases-event``): a C-index over one
  event ranks that one patient against the rest. The life-table counts by
  predicted risk group: ``cases-atrisk-<g>-<k>`` over itself, and
  ``km-events-<g>-<k>`` over the patients at risk in that interval, so a
  curve stops where fewer than the floor remain at risk.
- ``eval-loss``: over all validation cases (``num-val-cases``), which the
  caller has already held to the floor.

A key the rule does not know is withheld (the site trusts its own list, not a
task's new key). Plain Python: no Flower, no torch.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from common import wire

log = logging.getLogger("kidneyfl.client")

# Pseudo-denominator: every class with validation patients (balanced accuracy,
# macro AUC, accuracy). Its count is the smallest class count (classes with
# none left out).
ALL_CLASSES = "all-classes"
# Pseudo-denominator of the prognosis scores: min(patients with an outcome,
# events), from the task (client/tasks/prognosis/task.py).
SURVIVAL = "survival"
CLASS_PREFIX = "class-"

_CONFUSION = re.compile(r"cm-([a-z0-9_]+)-([a-z0-9_]+)")
_OVER_ALL_CLASSES = frozenset({wire.BALANCED_ACCURACY, wire.AUC_MACRO, wire.ACCURACY})
_OVER_ALL_CASES = frozenset({wire.EVAL_LOSS})


def class_denominator(name: str) -> str:
    """The count name for one class's validation patients (``class-stone``).

    Not a wire key: the count stays at the site.
    """
    return f"{CLASS_PREFIX}{name}"


def both_denominator(region: str) -> str:
    """The count name for a metric over the cases with *and* without a region
    (case-level detection AUC): the smaller of the two groups. Not a wire key."""
    return f"both-{region}"


def denominator(key: str) -> str | None:
    """The count a metric key describes, or None for a key the rule does not know.

    Returns
    -------
    str or None
        ``cases-X`` / ``cases-no-X`` (segmentation), ``class-c``
        (classification, per class), :data:`ALL_CLASSES`, or
        ``num-val-cases`` (all validation cases).
    """
    if key in _OVER_ALL_CASES:
        return wire.NUM_VAL_CASES
    if key in _OVER_ALL_CLASSES:
        return ALL_CLASSES
    if (found := wire.CANDIDATE_KEY.fullmatch(key)) is not None:
        return denominator(found[2])  # a post-processing candidate: as its metric
    if (group := wire.SUBGROUP_KEY.fullmatch(key)) is not None:
        inner = denominator(group[2])  # a subgroup: over the group's own cases
        return None if inner is None else f"{group[1]}{inner}"
    if key.startswith("cases-"):  # cases-X and cases-no-X: their own count
        return key
    if wire.SURVIVAL_SCORE.fullmatch(key):
        return SURVIVAL
    if (km := wire.KM_EVENTS_KEY.fullmatch(key)) is not None:
        return wire.atrisk_key(km[1], int(km[2]))
    if key.startswith(wire.DETECT_AUC_PREFIX):  # both groups: the smaller one
        return both_denominator(key.removeprefix(wire.DETECT_AUC_PREFIX))
    if key.startswith(wire.FP_LESIONS_PREFIX):
        return wire.NUM_VAL_CASES
    for prefix in (
        *wire.LESION_PRESENT_PREFIXES,
        wire.SURFACE_DICE_PREFIX,
        wire.DICE_PREFIX,
        wire.DICE_SQUARED_PREFIX,
    ):
        if key.startswith(prefix):
            return wire.cases_key(key.removeprefix(prefix))
    for prefix in ("fp-rate-", "fp-ml-", wire.DETECT_SPEC_PREFIX):
        if key.startswith(prefix):
            return wire.cases_key(key.removeprefix(prefix), present=False)
    if key.startswith(wire.RECALL_PREFIX):
        return class_denominator(key.removeprefix(wire.RECALL_PREFIX))
    if match := _CONFUSION.fullmatch(key):
        return class_denominator(match[1])  # the true class: the row
    return None


def is_count(key: str) -> bool:
    """Whether ``key`` is a count of patients (``cases-X``, ``cases-no-X``, and
    a subgroup's ``sg-<attr>-<value>-cases-X``)."""
    group = wire.SUBGROUP_KEY.fullmatch(key)
    return (group[2] if group else key).startswith("cases-")


def denominator_counts(
    metrics: Mapping[str, float], n_val: int, task_counts: Mapping[str, int]
) -> dict[str, int]:
    """Patients behind every denominator of a task's metrics.

    Parameters
    ----------
    metrics : mapping
        The task's metrics; its ``cases-*`` keys are segmentation's counts
        (one case per patient).
    n_val : int
        Validation patients (``num-val-cases``).
    task_counts : mapping
        Counts the metrics do not carry, from the task (classification:
        ``class-c`` patients per class); kept at the site.
    """
    counts = {k: int(v) for k, v in metrics.items() if is_count(k)}
    counts.update({k: int(v) for k, v in task_counts.items()})
    counts[wire.NUM_VAL_CASES] = int(n_val)
    for key in list(counts):
        if key.startswith("cases-no-"):
            region = key.removeprefix("cases-no-")
            present = counts.get(wire.cases_key(region), 0)
            counts[both_denominator(region)] = min(present, counts[key])
    classes = [v for k, v in counts.items() if k.startswith(CLASS_PREFIX) and v > 0]
    counts[ALL_CLASSES] = min(classes) if classes else 0
    return counts


def release(
    metrics: Mapping[str, float], counts: Mapping[str, int], floor: int
) -> dict[str, float]:
    """The keys of ``metrics`` whose denominator holds at least ``floor`` patients.

    Released values are unchanged; every other key (below the floor, or with a
    denominator not in ``counts`` or not known) is left out and named, key only,
    in the site's log.

    Parameters
    ----------
    metrics : mapping
        A task's validation metrics.
    counts : mapping
        Patients per denominator (:func:`denominator_counts`).
    floor : int
        The fewest patients a released number may describe.
    """
    out: dict[str, float] = {}
    withheld = []
    for key, value in metrics.items():
        over = denominator(key)
        if over is not None and counts.get(over, 0) >= floor:
            out[key] = value
        else:
            withheld.append(key)
    if withheld:
        log.info(
            "validation metrics withheld, each over fewer than %d patients: %s",
            floor,
            ", ".join(sorted(withheld)),
        )
    return out
