"""Candidate post-processing rules, and the federation's choice among them.

A rule is a string of parts joined by ``+``, applied in the order written:

``none``
    Leave the prediction as it is (only on its own).
``min-mass-ml-V``
    Remove every tumour (label 2) component and every cyst (label 3)
    component smaller than ``V`` mL. A removed component becomes kidney when
    it touches a kidney voxel (label 1, 26-neighbourhood), else background.
``tumour-touches-kidney``
    Tumour components that touch no kidney or cyst voxel become background:
    a renal tumour grows from the kidney.
``kidney-largest-2``
    Of the kidney with its masses (labels 1, 2, 3) only the two largest
    connected components are kept; the rest becomes background.
``tumour-prob-T``
    Tumour voxels whose tumour probability is below ``T`` take the most
    probable of the other classes (needs the softmax probabilities).

Components are 26-connected, as in :mod:`common.lesions`. Each part looks at
the output of the part before it, so order matters: ``tumour-prob-0.7`` can
leave small tumour fragments that a later ``min-mass-ml-1`` removes and an
earlier one would not.

The choice (:func:`choose`)
---------------------------
Each site evaluates every rule of :data:`CANDIDATES` on its validation cases;
the coordinator sees only the federated aggregates of :data:`CHOICE_KEYS` per
rule, never a case. In the spirit of nnU-Net's post-processing choice, a rule
is adopted only when it clearly helps and costs nothing that matters:

- its score is the mean of tumour Dice, tumour lesion sensitivity and
  1 - the tumour false-positive rate (the share of tumour-free cases with any
  predicted tumour);
- it is eligible only if its kidney Dice and its tumour Dice are each at most
  0.005 below those of ``none`` and its tumour lesion sensitivity at most
  0.05 below; a rule lacking any of :data:`CHOICE_KEYS` is not eligible (when
  ``none`` lacks one, the guard on that metric cannot apply and is skipped);
- among eligible rules the highest score wins, ties going to the rule with
  fewer parts; the winner must beat ``none``'s score by more than 0.005,
  else ``none`` is kept.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from common.lesions import components

logger = logging.getLogger(__name__)

# The wire names of the candidates are their indexes here (``pp3-dice-tumour``):
# append new rules, never reorder or remove one, or old reports change meaning.
CANDIDATES: tuple[str, ...] = (
    "none",
    "tumour-touches-kidney",
    "min-mass-ml-0.5",
    "min-mass-ml-1",
    "min-mass-ml-2",
    "kidney-largest-2",
    "tumour-prob-0.7",
    "tumour-touches-kidney+min-mass-ml-1",
    "kidney-largest-2+tumour-touches-kidney+min-mass-ml-1",
    "kidney-largest-2+tumour-touches-kidney+min-mass-ml-2",
    "kidney-largest-2+tumour-touches-kidney+min-mass-ml-1+tumour-prob-0.7",
    # appended: stricter rules for cysts taken for tumours (never reorder)
    "tumour-prob-0.85",
    "min-mass-ml-5",
    "kidney-largest-2+tumour-touches-kidney+min-mass-ml-2+tumour-prob-0.85",
    "kidney-largest-2+tumour-touches-kidney+min-mass-ml-5",
)

CHOICE_KEYS: tuple[str, ...] = (
    "dice-kidney",
    "dice-tumour",
    "fp-rate-tumour",
    "lesion-sens-tumour",
    "fp-lesions-tumour",
)

# How far below ``none`` a rule may fall and stay eligible, and how far above
# it the winner must score.
DICE_TOLERANCE = 0.005
SENSITIVITY_TOLERANCE = 0.05
MIN_GAIN = 0.005
# Floating-point slack, so that a difference of exactly a tolerance behaves
# as written whatever the rounding of the aggregates.
_EPS = 1e-12

ALLOWED_FORMS = (
    "none (alone), min-mass-ml-V (V mL > 0, e.g. min-mass-ml-0.5), "
    "tumour-touches-kidney, kidney-largest-2, tumour-prob-T (0 < T < 1, "
    "e.g. tumour-prob-0.7)"
)
_NUMBER = r"(\d+(?:\.\d+)?)"
_MIN_MASS = re.compile(rf"min-mass-ml-{_NUMBER}")
_TUMOUR_PROB = re.compile(rf"tumour-prob-{_NUMBER}")
_KEY = re.compile(r"pp(0|[1-9]\d*)-(.+)")

BACKGROUND, KIDNEY, TUMOUR, CYST = 0, 1, 2, 3
N_CLASSES = 4


@dataclass(frozen=True)
class RulePart:
    """One part of a rule: its name and, for the parametrised ones, value."""

    name: str
    value: float | None = None


@dataclass(frozen=True)
class Choice:
    """The federation's post-processing choice.

    Attributes
    ----------
    rule : str
        The rule adopted (``"none"`` when none qualifies).
    score : float
        Its score (NaN when ``none`` is kept and lacks a score metric).
    reason : str
        One sentence with the figures behind the choice.
    table : dict of str to dict of str to float
        Per rule: the metrics given, ``score`` (when computable) and
        ``eligible`` (1.0 or 0.0).
    """

    rule: str
    score: float
    reason: str
    table: dict[str, dict[str, float]]


def _parse_part(part: str) -> RulePart:
    if part in ("none", "tumour-touches-kidney", "kidney-largest-2"):
        return RulePart(part)
    if m := _MIN_MASS.fullmatch(part):
        value = float(m.group(1))
        if value > 0:
            return RulePart("min-mass-ml", value)
    if m := _TUMOUR_PROB.fullmatch(part):
        value = float(m.group(1))
        if 0 < value < 1:
            return RulePart("tumour-prob", value)
    raise ValueError(f"unknown post-processing rule part {part!r}; {ALLOWED_FORMS}")


def parse_rule(rule: str) -> tuple[RulePart, ...]:
    """Parse and validate a post-processing rule.

    Parameters
    ----------
    rule : str
        Parts joined by ``+`` (see the module docstring).

    Returns
    -------
    tuple of RulePart
        The parts in the order they apply.

    Raises
    ------
    ValueError
        Naming the bad part and the allowed forms.
    """
    parts = tuple(_parse_part(p) for p in rule.split("+"))
    if len(parts) > 1 and any(p.name == "none" for p in parts):
        raise ValueError(f"'none' must stand alone, got {rule!r}; {ALLOWED_FORMS}")
    return parts


def without_probability(rule: str) -> str:
    """``rule`` without its ``tumour-prob`` parts (``none`` if nothing is
    left): the parts that only need a label map, re-applied after the label
    map is resampled to the scan's own grid, where resampling can split a
    thin component into fragments the rule would have removed."""
    parts = [p for p in rule.split("+") if not _TUMOUR_PROB.fullmatch(p)]
    parts = [p for p in parts if p != "none"]
    return "+".join(parts) if parts else "none"


def needs_probs(rule: str) -> bool:
    """Whether ``rule`` needs the softmax probabilities (a ``tumour-prob`` part)."""
    return any(p.name == "tumour-prob" for p in parse_rule(rule))


def _near(mask: np.ndarray) -> np.ndarray:
    """Voxels in ``mask`` or 26-adjacent to it."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    return ndimage.binary_dilation(mask, structure=structure)


def _touching(labelled: np.ndarray, n: int, near: np.ndarray) -> np.ndarray:
    """Per component 0..n: does it have a voxel in ``near`` (entry 0 unused)."""
    return np.bincount(labelled[near], minlength=n + 1) > 0


# per mass label: its components, their sizes, and which touch the kidney
_Masses = list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def _masses(labels: np.ndarray) -> _Masses:
    """What :func:`_min_mass` needs of a label map, whatever its limit."""
    near_kidney = _near(labels == KIDNEY)
    out = []
    for label in (TUMOUR, CYST):
        labelled, n = components(labels == label)
        sizes = np.bincount(labelled.ravel(), minlength=n + 1)
        out.append((labelled, sizes, _touching(labelled, n, near_kidney)))
    return out


def _min_mass(
    labels: np.ndarray,
    voxel_mm3: float,
    limit_ml: float,
    masses: _Masses | None = None,
) -> np.ndarray:
    out = labels.copy()
    limit_voxels = limit_ml * 1000.0 / voxel_mm3
    for labelled, sizes, touch in masses or _masses(labels):
        # a mass of exactly the limit stays (25 voxels of 0.08 mL at 2 mL),
        # whatever the rounding of limit_voxels
        small = sizes < limit_voxels * (1 - 1e-9)
        small[0] = False
        out[(small & touch)[labelled]] = KIDNEY
        out[(small & ~touch)[labelled]] = BACKGROUND
    return out


def _tumour_touches_kidney(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    labelled, n = components(labels == TUMOUR)
    touch = _touching(labelled, n, _near(np.isin(labels, (KIDNEY, CYST))))
    touch[0] = True
    out[~touch[labelled]] = BACKGROUND
    return out


def _kidney_largest_2(labels: np.ndarray) -> np.ndarray:
    out = labels.copy()
    labelled, n = components(labels != BACKGROUND)
    sizes = np.bincount(labelled.ravel(), minlength=n + 1)[1:]
    # stable: of equal sizes the component met first in scan order is kept
    largest = np.argsort(-sizes, kind="stable")[:2] + 1
    keep = np.zeros(n + 1, dtype=bool)
    keep[0] = True
    keep[largest] = True
    out[~keep[labelled]] = BACKGROUND
    return out


def _tumour_prob(labels: np.ndarray, probs: np.ndarray, threshold: float) -> np.ndarray:
    out = labels.copy()
    low = (labels == TUMOUR) & (probs[TUMOUR] < threshold)
    others = np.array([BACKGROUND, KIDNEY, CYST])
    best = others[np.argmax(probs[:, low][others], axis=0)]
    out[low] = best
    return out


def _check_inputs(
    labels: np.ndarray, probs: np.ndarray | None, spacing_mm: Sequence[float]
) -> None:
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(f"labels must be an integer label map, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= N_CLASSES):
        raise ValueError(f"labels must lie in 0..{N_CLASSES - 1}")
    if len(spacing_mm) != labels.ndim or not all(
        math.isfinite(s) and s > 0 for s in spacing_mm
    ):
        raise ValueError(
            f"spacing_mm must be {labels.ndim} positive values, got {spacing_mm}"
        )
    if probs is not None and probs.shape != (N_CLASSES, *labels.shape):
        raise ValueError(
            f"probs must have shape {(N_CLASSES, *labels.shape)}, got {probs.shape}"
        )


def apply_rule(
    labels: np.ndarray,
    probs: np.ndarray | None,
    spacing_mm: Sequence[float],
    rule: str,
) -> np.ndarray:
    """Apply a post-processing rule to one case's predicted label map.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer label map (0 background, 1 kidney, 2 tumour, 3 cyst); not
        modified.
    probs : numpy.ndarray or None
        Softmax probabilities ``(4, *labels.shape)``; needed by
        ``tumour-prob`` parts only.
    spacing_mm : sequence of float
        Voxel spacing in mm, one value per axis of ``labels``.
    rule : str
        The rule (see the module docstring).

    Returns
    -------
    numpy.ndarray
        A new ``uint8`` label map of ``labels``' shape.

    Raises
    ------
    ValueError
        For a bad rule, bad inputs, or a ``tumour-prob`` part without
        ``probs``.
    """
    parts = parse_rule(rule)
    labels = np.asarray(labels)
    _check_inputs(labels, probs, spacing_mm)
    voxel_mm3 = float(np.prod(np.asarray(spacing_mm, dtype=float)))
    out = labels.astype(np.uint8)  # always a copy
    for part in parts:
        if part.name == "min-mass-ml":
            assert part.value is not None  # set by the parser
            out = _min_mass(out, voxel_mm3, part.value)
        elif part.name == "tumour-touches-kidney":
            out = _tumour_touches_kidney(out)
        elif part.name == "kidney-largest-2":
            out = _kidney_largest_2(out)
        elif part.name == "tumour-prob":
            assert part.value is not None
            if probs is None:
                raise ValueError(
                    f"rule part 'tumour-prob-{part.value:g}' of {rule!r} needs the "
                    "softmax probabilities, and none were given"
                )
            out = _tumour_prob(out, probs, part.value)
    return out


def apply_rules(
    labels: np.ndarray,
    probs: np.ndarray | None,
    spacing_mm: Sequence[float],
    rules: Sequence[str],
) -> list[np.ndarray]:
    """:func:`apply_rule` for each of ``rules`` on one case, each shared
    prefix of parts computed once.

    The candidates share their first parts (``kidney-largest-2+
    tumour-touches-kidney`` begins five of them), and each part costs a
    connected-component labelling of the volume; the results equal
    :func:`apply_rule`'s rule by rule. Returned maps may be the same object
    for rules that end at the same prefix: treat them as read-only.
    """
    labels = np.asarray(labels)
    _check_inputs(labels, probs, spacing_mm)
    voxel_mm3 = float(np.prod(np.asarray(spacing_mm, dtype=float)))
    done: dict[str, np.ndarray] = {"": labels.astype(np.uint8)}
    masses: dict[str, _Masses] = {}  # per prefix: its components, for any limit
    out = []
    for rule in rules:
        prefix = ""
        # parse_rule: the same errors as apply_rule
        for text, part in zip(rule.split("+"), parse_rule(rule), strict=True):
            if part.name == "none":
                continue
            step = f"{prefix}+{text}" if prefix else text
            if step not in done:
                if part.name == "min-mass-ml":
                    assert part.value is not None  # set by the parser
                    if prefix not in masses:
                        masses[prefix] = _masses(done[prefix])
                    done[step] = _min_mass(
                        done[prefix], voxel_mm3, part.value, masses[prefix]
                    )
                else:
                    done[step] = apply_rule(done[prefix], probs, spacing_mm, text)
            prefix = step
        out.append(done[prefix])
    return out


def candidate_key(index: int, key: str) -> str:
    """Metric key of candidate ``index``: ``pp{index}-{key}``.

    Raises
    ------
    ValueError
        If ``index`` is not an index of :data:`CANDIDATES` or ``key`` is empty.
    """
    if not 0 <= index < len(CANDIDATES) or not key:
        raise ValueError(
            f"need a candidate index in 0..{len(CANDIDATES) - 1} and a key, "
            f"got {index!r}, {key!r}"
        )
    return f"pp{index}-{key}"


def split_candidate_key(key: str) -> tuple[int, str] | None:
    """Inverse of :func:`candidate_key`; None for any other key."""
    m = _KEY.fullmatch(key)
    if m is None or int(m.group(1)) >= len(CANDIDATES):
        return None
    return int(m.group(1)), m.group(2)


def _value(metrics: Mapping[str, float], key: str) -> float | None:
    value = metrics.get(key)
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _score(metrics: Mapping[str, float]) -> float | None:
    values = [_value(metrics, k) for k in ("dice-tumour", "lesion-sens-tumour")]
    fp_rate = _value(metrics, "fp-rate-tumour")
    if fp_rate is None or None in values:
        return None
    return (sum(v for v in values if v is not None) + 1.0 - fp_rate) / 3.0


# metric, tolerated drop below none's
_GUARDS = (
    ("dice-kidney", DICE_TOLERANCE),
    ("dice-tumour", DICE_TOLERANCE),
    ("lesion-sens-tumour", SENSITIVITY_TOLERANCE),
)


def _eligible(metrics: Mapping[str, float], baseline: Mapping[str, float]) -> bool:
    if any(_value(metrics, k) is None for k in CHOICE_KEYS):
        return False
    for key, tolerance in _GUARDS:
        base = _value(baseline, key)
        value = _value(metrics, key)
        if base is not None and value is not None and value < base - tolerance - _EPS:
            return False
    return True


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# what the reason for adopting a rule reports, in order
_REPORTED = (
    ("tumour FP rate", "fp-rate-tumour"),
    ("FP lesions per case", "fp-lesions-tumour"),
    ("lesion sensitivity", "lesion-sens-tumour"),
    ("tumour Dice", "dice-tumour"),
    ("kidney Dice", "dice-kidney"),
)


def _table_row(metrics: Mapping[str, float], eligible: bool) -> dict[str, float]:
    row = {k: float(v) for k, v in metrics.items()}
    if (score := _score(metrics)) is not None:
        row["score"] = score
    row["eligible"] = float(eligible)
    return row


def choose(per_rule: Mapping[str, Mapping[str, float]]) -> Choice:
    """Choose the federation's post-processing rule from aggregated metrics.

    Parameters
    ----------
    per_rule : mapping of str to mapping of str to float
        Per rule (as written in :data:`CANDIDATES`), its federated validation
        metrics; :data:`CHOICE_KEYS` are used. Must include ``"none"``.

    Returns
    -------
    Choice
        The rule adopted under the criterion of the module docstring (equal
        scores: fewer parts, then the rule listed first), its score, a
        one-sentence reason with the figures, and the table.

    Raises
    ------
    ValueError
        If ``"none"`` is missing or a rule does not parse.
    """
    if "none" not in per_rule:
        raise ValueError("choose() needs the metrics of rule 'none', the baseline")
    base = per_rule["none"]
    base_score = _score(base)
    table: dict[str, dict[str, float]] = {}
    ranked = []  # (score, parts, order, rule) of eligible rules
    for order, (name, metrics) in enumerate(per_rule.items()):
        ok = name != "none" and _eligible(metrics, base)
        table[name] = _table_row(metrics, ok)
        if ok:
            ranked.append((table[name]["score"], len(parse_rule(name)), order, name))

    missing = [k for k, _ in _GUARDS if _value(base, k) is None]
    note = f" (none lacks {', '.join(missing)}, so that guard was skipped)"
    note = note if missing else ""
    if base_score is None:
        note += " (none has no score, so no margin over it was required)"

    rule, score = "none", base_score
    if len(per_rule) == 1:
        reason = "none kept: no other rule was evaluated"
    elif not ranked:
        reason = (
            "none kept: no candidate rule kept kidney and tumour Dice within "
            f"{DICE_TOLERANCE} and tumour lesion sensitivity within "
            f"{SENSITIVITY_TOLERANCE} of none's with every metric reported{note}"
        )
    else:
        top = max(r[0] for r in ranked)
        best, _, _, winner = min(
            (r for r in ranked if r[0] >= top - _EPS), key=lambda r: (r[1], r[2])
        )
        if base_score is None or best > base_score + MIN_GAIN + _EPS:
            rule, score = winner, best
            changes = ", ".join(
                f"{label} {_fmt(_value(base, key))} -> "
                f"{_fmt(_value(per_rule[winner], key))}"
                for label, key in _REPORTED
            )
            reason = f"{winner}: {changes} (score {_fmt(base_score)} -> "
            reason += f"{_fmt(best)}){note}"
        else:
            reason = (
                f"none kept: the best eligible rule, {winner}, scores {_fmt(best)} "
                f"against none's {_fmt(base_score)}, not more than {MIN_GAIN} "
                f"better{note}"
            )
    logger.info("post-processing choice: %s", reason)
    return Choice(
        rule=rule,
        score=float("nan") if score is None else score,
        reason=reason,
        table=table,
    )
