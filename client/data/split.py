"""The patient-level split both tasks use, with one meaning per YAML key.

1. ``data.exclude_cases`` (case or patient ids) are left out; an id that is no
   case or patient of the site is an error (:func:`leave_out`).
2. Cases are pinned: by ``data.train_cases`` / ``data.validation_cases`` (case
   ids; an id that is not a usable case is an error) when either is set, else
   by the manifest's ``split`` column. ``test`` rows are never trained or
   validated on. A patient with one pinned case goes where that case goes.
3. The YAML's lists are explicit: a site that lists ``data.train_cases``
   trains on those and nothing else. Unlisted patients validate when only
   ``train_cases`` is set, train when only ``validation_cases`` is set, and
   are left out (neither trained nor validated) when both are set.
4. Otherwise (the manifest's ``split`` column, or nothing), when no patient is
   pinned to validation the unpinned patients are split at random with
   ``data.split_seed``: ``round(n x data.validation_fraction)`` patients per
   stratum (classification: a patient's most common class; segmentation: one
   stratum), at least one when the fraction is above 0 and at least one left
   to train. When some are pinned to validation, the unpinned train.

A patient whose cases are pinned to both sides stays on both, so that
:mod:`client.data.patients` names it and training refuses.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from client.data.errors import SiteDataError
from common.config import SiteConfig

TRAIN, VALIDATION, TEST = "train", "validation", "test"


class OfPatient(Protocol):
    """A case of either task: its id and its patient's."""

    @property
    def case_id(self) -> str: ...

    @property
    def patient_id(self) -> str: ...


C = TypeVar("C", bound=OfPatient)


def leave_out(
    cases: list[C], exclude: list[str] | None, skipped: dict[str, str]
) -> list[C]:
    """``cases`` less those whose case or patient id ``data.exclude_cases``
    lists; the left out are added to ``skipped``.

    Raises
    ------
    SiteDataError
        If ``exclude`` names an id that is no case or patient of the site.
    """
    names = set(exclude or [])
    known = {c.case_id for c in cases} | {c.patient_id for c in cases}
    if unknown := sorted(names - known):
        raise SiteDataError(
            f"data.exclude_cases names {unknown}, which are neither cases nor "
            "patients of this site; fix the spelling or remove them"
        )
    kept = []
    for c in cases:
        if c.case_id in names or c.patient_id in names:
            skipped[c.case_id] = "left out by data.exclude_cases"
        else:
            kept.append(c)
    return kept


def split_by_patient(
    cases: list[C],
    site: SiteConfig,
    column: Callable[[C], str],
    stratum: Callable[[list[C]], int] | None = None,
) -> tuple[list[C], list[C]]:
    """Training and validation cases, in the order of ``cases``, by the rules
    of this module.

    Parameters
    ----------
    cases : list
        The usable labelled cases (exclusions already applied).
    site : SiteConfig
        For ``data.train_cases``, ``validation_cases``, ``validation_fraction``
        and ``split_seed``.
    column : callable
        A case's manifest split: ``train``, ``validation``, ``test`` or ``""``.
    stratum : callable, optional
        A patient's stratum from its cases (default: one stratum).

    Raises
    ------
    SiteDataError
        If the YAML's lists name a case that is not usable, or no case is left
        to train.
    """
    pins = _pins(cases, site, column)
    cases = [c for c in cases if TEST not in pins[c.case_id]]
    groups: dict[str, list[C]] = {}
    for c in cases:
        groups.setdefault(c.patient_id, []).append(c)
    side: dict[str, set[str]] = {}  # case id -> {train} / {validation} / both
    rest = []
    for group in groups.values():
        pinned = set().union(*(pins[c.case_id] for c in group))
        if not pinned:
            rest.append(group)
        for c in group:
            side[c.case_id] = pins[c.case_id] or pinned
    unpinned = _unpinned_side(site)
    if unpinned is None:
        if any(VALIDATION in s for s in side.values()):
            chosen: set[str] = set()
        else:
            chosen = _random_validation(rest, site, stratum or (lambda g: 0))
        for group in rest:
            for c in group:
                side[c.case_id] = {VALIDATION if c.patient_id in chosen else TRAIN}
    else:
        for group in rest:
            for c in group:
                side[c.case_id] = unpinned
    train = [c for c in cases if TRAIN in side[c.case_id]]
    val = [c for c in cases if VALIDATION in side[c.case_id]]
    if not train:
        raise SiteDataError(
            f"site {site.name}: no usable labelled case is left to train; label "
            "more cases, pin fewer to validation or lower data.validation_fraction"
        )
    return train, val


def _unpinned_side(site: SiteConfig) -> set[str] | None:
    """Where the YAML's lists send an unlisted patient; None: no lists."""
    d = site.data
    if d.train_cases is None and d.validation_cases is None:
        return None
    if d.train_cases is None:
        return {TRAIN}
    if d.validation_cases is None:
        return {VALIDATION}
    return set()  # both listed: the unlisted are left out


def _pins(
    cases: Iterable[C], site: SiteConfig, column: Callable[[C], str]
) -> dict[str, set[str]]:
    """Case id -> the sides it is pinned to (empty: not pinned)."""
    d = site.data
    if d.train_cases is None and d.validation_cases is None:
        return {c.case_id: {column(c)} - {""} for c in cases}
    named = (d.train_cases or []) + (d.validation_cases or [])
    known = {c.case_id for c in cases if column(c) != TEST}
    if missing := [i for i in named if i not in known]:
        raise SiteDataError(
            f"site {site.name}: cases {missing} named in the site YAML are not "
            "usable (unknown, unlabelled, unreadable, excluded or a test row); fix "
            "data.train_cases / data.validation_cases"
        )
    train, val = set(d.train_cases or []), set(d.validation_cases or [])
    return {
        c.case_id: ({TRAIN} if c.case_id in train else set())
        | ({VALIDATION} if c.case_id in val else set())
        | ({TEST} if column(c) == TEST else set())
        for c in cases
    }


def _random_validation(
    groups: list[list[C]], site: SiteConfig, stratum: Callable[[list[C]], int]
) -> set[str]:
    """Patient ids drawn for validation, per stratum, seeded by the site."""
    d = site.data
    rng = random.Random(d.split_seed)
    chosen: set[str] = set()
    for s in sorted({stratum(g) for g in groups}):
        ids = sorted(g[0].patient_id for g in groups if stratum(g) == s)
        rng.shuffle(ids)
        chosen.update(ids[: validation_count(len(ids), d.validation_fraction)])
    return chosen


def validation_count(n: int, fraction: float) -> int:
    """Patients of ``n`` that validate: ``round(n x fraction)``, at least one
    when ``fraction`` > 0, and never all of them."""
    k = max(1, round(n * fraction)) if fraction > 0 else 0
    return max(0, min(k, n - 1))
