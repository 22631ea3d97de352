"""What ``kidneyfl site check`` says about a site's outcomes, for the prognosis
task (issue 30).

The outcomes are read as :mod:`client.data.outcomes` reads them (the same
source, the same validation). Every invalid file, row or entry is an ERROR
naming the file, the row or entry, and the fix; WARNINGs name what leaves
prognosis little to learn from or measure: usable cases without an outcome, a
split under the floor of patients or events, and mostly censored follow-up. No
source at all is a note only (the site may be for segmentation). Plain Python.
"""

from __future__ import annotations

from pathlib import Path

from client.data.case_check import FATAL, WARN, Finding
from client.data.check_report import DataCheck
from client.data.outcomes import Outcome, _read
from common.config import SiteConfig

MAX_LISTED = 5  # case ids a warning lists
MOSTLY_CENSORED = 0.9


def check_outcomes(
    site: SiteConfig,
    train_ids: list[str],
    val_ids: list[str],
    floor: int,
    report: DataCheck,
) -> None:
    """What ``kidneyfl site check`` says about the site's outcomes.

    Adds a note naming the source with patients, events and the share censored
    per split; an ERROR for each invalid file, row or entry; WARNINGs for usable
    cases without an outcome, for a validation split under ``floor`` patients or
    events (its prognosis metrics are withheld), for training under ``floor``
    events, and for more than 90 % censored. No source at all is a note only
    (the site may be for segmentation). Never raises for the data's sake.

    Parameters
    ----------
    site : SiteConfig
        The site.
    train_ids, val_ids : list of str
        The usable cases of each split (one per patient: prognosis takes one
        scan per patient).
    floor : int
        The fewest patients and events a released aggregate may describe.
    report : DataCheck
        Filled in place.
    """
    read = _read(site)
    if read is None:
        report.notes.append(
            "no outcomes found (outcomes.csv, manifest time/event, kits.json): "
            "prognosis cannot run at this site"
        )
        return
    file = str(read.path)
    for p in read.problems:
        report.findings.append(Finding(p.kind, FATAL, file, p.located, p.fix))
    if read.problems:
        report.notes.append(
            f"outcomes from {read.kind} {file}: {len(read.problems)} problem(s) "
            "listed below; prognosis refuses the site until they are fixed"
        )
        return
    got = read.outcomes
    train = [got[c] for c in train_ids if c in got]
    val = [got[c] for c in val_ids if c in got]
    censored = sum(1 - o.event for o in train + val)
    unmatched = len(set(got) - set(train_ids) - set(val_ids))
    report.notes.append(
        f"outcomes from {read.kind} {file}: training {len(train)} patient(s) with "
        f"an outcome, {sum(o.event for o in train)} event(s); validation "
        f"{len(val)} patient(s), {sum(o.event for o in val)} event(s); "
        f"{censored} of {len(train + val)} censored "
        f"({censored / max(1, len(train + val)):.0%})"
        + (f"; {unmatched} outcome(s) for no usable case" if unmatched else "")
    )
    missing = [c for c in train_ids + val_ids if c not in got]
    for kind, message, fix in _warnings(read.path, train, val, missing, floor):
        report.findings.append(Finding(kind, WARN, file, message, fix))


def _warnings(
    path: Path, train: list[Outcome], val: list[Outcome], missing: list[str], floor: int
) -> list[tuple[str, str, str]]:
    """(kind, message, fix) of each WARNING about usable outcomes."""
    out = []
    if missing:
        more = len(missing) - MAX_LISTED
        listed = ", ".join(missing[:MAX_LISTED]) + (
            f" and {more} more" if more > 0 else ""
        )
        message = (
            f"{len(missing)} usable case(s) have no outcome and are left out of "
            f"prognosis: {listed}"
        )
        fix = (
            f"add their follow-up time and event to {path.name} (case ids as the "
            "layout names them), or leave them to segmentation"
        )
        out.append(("outcomes-missing", message, fix))
    val_events, train_events = sum(o.event for o in val), sum(o.event for o in train)
    if len(val) < floor or val_events < floor:
        message = (
            f"validation has {len(val)} patient(s) with an outcome and {val_events} "
            f"event(s), under the floor of {floor}: prognosis metrics will be "
            "withheld: C-index and the others are released only over at least "
            f"{floor} patients and {floor} events"
        )
        fix = (
            "raise data.validation_fraction or add patients with follow-up, or lower "
            "privacy.min_cases_for_aggregates if the site accepts releasing "
            "aggregates over fewer"
        )
        out.append(("outcomes-few-validation", message, fix))
    if train_events < floor:
        message = (
            f"training has {train_events} event(s) among {len(train)} patient(s) "
            f"with an outcome, fewer than {floor}: this site teaches the prognosis "
            "model little"
        )
        fix = "add patients with events or longer follow-up"
        out.append(("outcomes-few-training-events", message, fix))
    share = sum(1 - o.event for o in train + val) / max(1, len(train + val))
    if share > MOSTLY_CENSORED:
        message = (
            f"{share:.0%} of the patients with an outcome are censored (more than "
            f"{MOSTLY_CENSORED:.0%}): few events to learn from and to measure "
            "concordance on"
        )
        fix = "check that event 1 means the event happened, or extend the follow-up"
        out.append(("outcomes-mostly-censored", message, fix))
    return out
