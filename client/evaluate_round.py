"""What a site releases besides its update: validation metrics and its fingerprint.

Both are aggregates not covered by DP, so both are the site's choice: sent only
when the site's settings allow it and at least its floor of patients stand
behind them (the coordinator may raise the floor, never lower it). A release
the site will not make is a refusal (:class:`client.refusals.Declined`) or a
``metrics-withheld`` marker. The floor holds for every number, not just for
the whole validation set: a metric over fewer patients (a region only one
patient has, a rare class) is left out of the reply (:mod:`client.disclosure`),
and every fingerprint statistic describes at least the floor of patients
(:func:`common.fingerprint.site_fingerprint`). Flower-free.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from client.clinical_round import clinical_values
from client.disclosure import denominator_counts, release
from client.prepare import Reply, Request, Round, prepare, setup
from client.refusals import Declined
from client.tasks.segmentation.cases import load_site_cases, raw_volumes
from client.timings import record_timing
from common import wire
from common.config import SiteConfig
from common.fingerprint import site_fingerprint
from common.logs import log_request
from common.postprocess import CANDIDATES

log = logging.getLogger("kidneyfl.client")


PHANTOM_MARKER = "phantom.json"  # written by `kidneyfl phantom` in its folder


def synthetic_data(site: SiteConfig) -> int:
    """1 when the site's data are phantoms (a ``phantom`` block in its YAML, or
    a data folder written by ``kidneyfl phantom``), else 0: one fact about the
    dataset, sent with every evaluation for the final model's provenance."""
    root = site.data.root
    marker = root / PHANTOM_MARKER if root is not None else None
    return int(site.phantom is not None or (marker is not None and marker.is_file()))


def aggregate_floor(site: SiteConfig, requested: int = 0) -> int:
    """The fewest patients a released aggregate may describe at this site.

    The site's own ``privacy.min_cases_for_aggregates``; the coordinator may ask
    for more, never for less.
    """
    return max(site.privacy.min_cases_for_aggregates, int(requested))


def validation_metrics(r: Round, candidates: bool = False) -> dict[str, Any]:
    """The task's validation metrics, or only a withheld marker.

    Validation metrics are means over validation patients, not covered by DP:
    the site releases them only by its own choice and above its floor. Each
    metric is held to the floor over its own denominator (the cases with a
    region, a class's patients): :func:`client.disclosure.release` leaves out
    the keys below it. Evaluate and fine-tune replies both come through here.
    """
    site, n_val = r.site, r.data.n_val
    values: dict[str, Any] = {wire.NUM_VAL_CASES: n_val}
    floor = aggregate_floor(site, int(r.config.get(wire.MIN_CASES_FOR_AGGREGATES, 0)))
    if not site.privacy.share_validation_metrics or n_val < floor:
        log.info(
            "validation metrics withheld (share_validation_metrics=%s, %d "
            "validation cases, floor %d)",
            site.privacy.share_validation_metrics,
            n_val,
            floor,
        )
        values[wire.METRICS_WITHHELD] = 1
        return values
    options: dict[str, Any] = {}
    if candidates or r.checked.postprocess:  # segmentation only (request_guard)
        options = {
            "candidates": candidates,
            "postprocess": CANDIDATES[r.checked.postprocess],
        }
    metrics = r.task.evaluate(r.model, r.data, r.plan, r.device, **options)
    task_counts = getattr(r.task, "denominators", None)
    # a task without the method: only the counts its metrics carry are known,
    # and release() withholds the keys whose count is not
    extra = task_counts(r.data, r.plan) if task_counts is not None else {}
    values.update(release(metrics, denominator_counts(metrics, n_val, extra), floor))
    return values


def evaluate_round(request: Request) -> Reply:
    """The global model's validation metrics at this site (means only)."""
    r = prepare(request, default_round=0)
    started = time.perf_counter()
    if r.checked.clinical_stage:
        floor = aggregate_floor(r.site, r.checked.floor)
        values = clinical_values(
            r, floor, functools.partial(validation_metrics, r, candidates=True)
        )
    else:
        values = validation_metrics(r)
    values[wire.DATA_SYNTHETIC] = synthetic_data(r.site)
    work_s = time.perf_counter() - started
    record_timing(r.site, r.run_id, r.number, "evaluate", r.load_s, work_s)
    values[wire.NUM_EXAMPLES] = r.data.n_train
    shared = "metrics withheld" if wire.METRICS_WITHHELD in values else "means sent"
    log_request(
        r.site.name,
        "evaluate",
        r.number,
        "evaluated",
        f"{r.data.n_val} validation cases, {shared}",
    )
    return Reply(r.site.name, values)


def fingerprint_round(request: Request) -> Reply:
    """Aggregate dataset statistics for the federated preprocessing plan.

    Sent only if the site shares its fingerprint (``privacy.share_fingerprint``)
    and has at least its floor of usable patients; every statistic in it then
    describes at least that floor of patients (``site_fingerprint``'s
    ``floor``).

    Raises
    ------
    Declined
        ``not-shared`` or ``too-few-cases``.
    """
    r = setup(request)
    site = r.site
    if not site.privacy.share_fingerprint:
        raise Declined("not-shared", "site choice (privacy.share_fingerprint)")
    cases = load_site_cases(site)
    usable = cases.train + cases.validation
    requested = int(r.config.get(wire.FINGERPRINT_MIN_CASES, 5))
    floor = aggregate_floor(site, requested)
    if len(usable) < floor:
        raise Declined("too-few-cases", "fewer usable patients than the floor")
    stats = site_fingerprint(raw_volumes(usable, cases.label_map), floor)
    log_request(
        site.name, "query", None, "sent its fingerprint", f"{len(usable)} cases"
    )
    return Reply(site.name, stats)
