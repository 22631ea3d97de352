"""What a site accepts from a coordinator's request, checked before any work.

The site trusts nothing a request carries (issue 27; docs/privacy.md, "Threat
model"). Every number that decides what is spent, trained or released comes
from the coordinator: the plan (Flower's run config, validated by
``common.config.Plan`` with NaN and infinity refused) and the message's config
record (run id, round, total rounds, fine-tune steps, learning rate, proximal
term, requested floors). This module checks the config record's values for
type, finiteness and the plan's bounds, and the plan against the site's own
limits (``privacy`` in the site YAML), and refuses with a stable code
(:class:`client.request_refused.RequestRefused`) before anything is
calibrated, spent, trained or released:

- ``request-invalid``: a value missing, of the wrong type, non-finite, zero
  where it must be positive, or outside the plan's bounds; a run id that is not
  a short plain name;
- ``limit-exceeded``: more than the site's limits allow (rounds, local epochs,
  fine-tune steps, epsilon per run);
- ``query-limit``: the run has used its allowance of evaluate, fine-tune and
  query requests (:class:`QueryCounter`), each a release of aggregates.

What the ledger checks in the same locked step as the spend (the run's
calibration bound to its schedule, its planned steps, the noise floor, the
per-run and lifetime epsilon) is in
:meth:`client.privacy.ledger.PrivacyLedger.spend_round`. Flower-free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.request_refused import RequestRefused
from common import wire
from common.atomic import atomic_write_json
from common.config import Plan, SiteConfig
from common.ood import STD_FLOOR
from common.postprocess import CANDIDATES

# A run id names the run in the site's ledger, audit log and state: a short
# plain name. It never names a file as given (see run_key).
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}")
MAX_ROUND = 1_000_000  # far beyond any plan's 10,000 rounds, fine-tuning included
MAX_FLOOR = 100_000  # the site YAML's own bound on its floor
MAX_PROXIMAL_MU = 1e4
TRAIN, FINE_TUNE = "train", f"train.{wire.FINE_TUNE_ACTION}"
COUNTS_NAME = "request-counts.json"


def refuse(key: str, value: Any, why: str) -> RequestRefused:
    """``request-invalid`` for ``key``; the value appears in the site's log only."""
    return RequestRefused(
        "request-invalid", f"request key {key!r} = {str(value)[:80]!r}: {why}"
    )


def integer(
    cfg: Mapping[str, Any], key: str, lo: int, hi: int, *, required: bool = True
) -> int | None:
    """``cfg[key]`` as an int in [lo, hi]; None when absent and not required.

    A bool, a float (even 3.0), a string or a list is refused: Flower's config
    records keep the sender's type, and the coordinator sends ints.
    """
    if key not in cfg:
        if required:
            raise refuse(key, None, "missing")
        return None
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise refuse(key, value, f"must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise refuse(key, value, f"must be from {lo} to {hi}")
    return value


def number(
    cfg: Mapping[str, Any], key: str, lo: float, hi: float, *, above: bool = False
) -> float | None:
    """``cfg[key]`` as a finite float in [lo, hi] (or (lo, hi]); None if absent."""
    if key not in cfg:
        return None
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise refuse(key, value, f"must be a number, not {type(value).__name__}")
    value = float(value)
    low_ok = value > lo if above else value >= lo
    if not (math.isfinite(value) and low_ok and value <= hi):
        raise refuse(key, value, f"must be a finite number in {lo}..{hi}")
    return value


def run_id(cfg: Mapping[str, Any]) -> str:
    """The coordinator's run id: required, a short plain name."""
    value = cfg.get(wire.RUN_ID)
    if not isinstance(value, str) or not RUN_ID_PATTERN.fullmatch(value):
        raise refuse(
            wire.RUN_ID,
            value,
            "a run id is 1 to 128 letters, digits and _ . : @ + -, starting with a "
            "letter or digit",
        )
    return value


def run_key(run: str) -> str:
    """The name a run's files at the site take: a hash, never the id as given."""
    return hashlib.sha256(run.encode()).hexdigest()[:24]


def round_number(cfg: Mapping[str, Any], *, required: bool) -> int | None:
    """The global round (``global-round``, else Flower's ``server-round``)."""
    key = wire.GLOBAL_ROUND if wire.GLOBAL_ROUND in cfg else wire.SERVER_ROUND
    return integer(cfg, key, 0, MAX_ROUND, required=required)


@dataclass(frozen=True)
class Checked:
    """A request's values as the site accepted them."""

    run_id: str
    round: int | None
    total_rounds: int | None = None
    fine_tune_steps: int | None = None
    learning_rate: float | None = None
    proximal_mu: float = 0.0
    floor: int = 0  # the floor the coordinator asks for (the site may use more)
    # rounds of this run the coordinator says it did not use this site's
    # update of (the site marks only those its own ledger spent on)
    unused_rounds: tuple[int, ...] = ()
    # evaluate: the post-run clinical calibration's stage (0: a plain
    # evaluation), the post-processing rule to apply (an index into
    # common.postprocess.CANDIDATES), and stage 2's OOD reference
    clinical_stage: int = 0
    postprocess: int = 0
    ood_mean: tuple[float, ...] | None = None
    ood_std: tuple[float, ...] | None = None


def unused_rounds(cfg: Mapping[str, Any]) -> tuple[int, ...]:
    """The ``unused-rounds`` a request carries: at most ``MAX_UNUSED_ROUNDS``
    integers in [1, MAX_ROUND]; absent is none.

    Raises
    ------
    RequestRefused
        ``request-invalid`` for anything else.
    """
    value = cfg.get(wire.UNUSED_ROUNDS)
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > wire.MAX_UNUSED_ROUNDS:
        raise refuse(
            wire.UNUSED_ROUNDS,
            value,
            f"must be a list of at most {wire.MAX_UNUSED_ROUNDS} round numbers",
        )
    for r in value:
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_ROUND:
            raise refuse(wire.UNUSED_ROUNDS, value, "must hold round numbers only")
    return tuple(sorted(set(value)))


def check_request(
    kind: str, cfg: Mapping[str, Any] | None, plan: Plan, site: SiteConfig
) -> Checked:
    """Every value of a request that decides what is spent or released, checked.

    Parameters
    ----------
    kind : str
        Flower's message type: ``train``, ``train.finetune``, ``evaluate``,
        ``query``.
    cfg : Mapping or None
        The message's config record.
    plan, site : Plan, SiteConfig
        The validated plan (the coordinator's) and site YAML (the site's own).

    Raises
    ------
    RequestRefused
        ``request-invalid`` or ``limit-exceeded``, naming the key in the site's
        log.
    """
    if cfg is None:
        raise refuse(wire.CONFIG, None, "the request has no config record")
    rid = run_id(cfg)
    floor_keys = (wire.MIN_CASES_FOR_AGGREGATES, wire.FINGERPRINT_MIN_CASES)
    floor = max(integer(cfg, k, 0, MAX_FLOOR, required=False) or 0 for k in floor_keys)
    unused = unused_rounds(cfg)
    if kind == TRAIN:
        checked = _train(cfg, plan, site, rid, floor)
    elif kind == FINE_TUNE:
        checked = _fine_tune(cfg, plan, site, rid, floor)
    elif kind == "evaluate":
        checked = _evaluate(cfg, rid, floor)
    elif kind == "query":
        checked = Checked(rid, round_number(cfg, required=False), floor=floor)
    else:
        raise refuse("message-type", kind, "the site answers train, evaluate and query")
    return dataclasses.replace(checked, unused_rounds=unused)


def _schedule_limits(cfg: Mapping[str, Any], plan: Plan, site: SiteConfig) -> int:
    """Total rounds and the plan's training against the site's limits."""
    p = site.privacy
    total = integer(cfg, wire.TOTAL_ROUNDS, 1, 10_000)
    assert total is not None  # required
    if total > p.max_rounds_per_run:
        raise RequestRefused(
            "limit-exceeded",
            f"the run plans {total} rounds; this site allows at most "
            f"{p.max_rounds_per_run} per run (privacy.max_rounds_per_run)",
        )
    if plan.local_epochs > p.max_local_epochs:
        raise RequestRefused(
            "limit-exceeded",
            f"the plan asks for {plan.local_epochs} local epochs; this site allows "
            f"at most {p.max_local_epochs} (privacy.max_local_epochs)",
        )
    if plan.fine_tune_steps > p.max_fine_tune_steps:
        raise RequestRefused(
            "limit-exceeded",
            f"the plan asks for {plan.fine_tune_steps} fine-tune steps; this site "
            f"allows at most {p.max_fine_tune_steps} (privacy.max_fine_tune_steps)",
        )
    return total


def _train(
    cfg: Mapping[str, Any], plan: Plan, site: SiteConfig, rid: str, floor: int
) -> Checked:
    total = _schedule_limits(cfg, plan, site)
    rnd = round_number(cfg, required=True)
    assert rnd is not None
    if rnd < 1:
        raise refuse(wire.GLOBAL_ROUND, rnd, "a train round is numbered from 1")
    return Checked(
        rid,
        rnd,
        total_rounds=total,
        learning_rate=number(cfg, wire.LEARNING_RATE, 0.0, 10.0, above=True),
        proximal_mu=number(cfg, wire.PROXIMAL_MU, 0.0, MAX_PROXIMAL_MU) or 0.0,
        floor=floor,
    )


def _fine_tune(
    cfg: Mapping[str, Any], plan: Plan, site: SiteConfig, rid: str, floor: int
) -> Checked:
    total = _schedule_limits(cfg, plan, site)
    rnd = round_number(cfg, required=True)
    steps = integer(cfg, wire.FINE_TUNE_STEPS, 1, 100_000)
    assert steps is not None
    if steps > plan.fine_tune_steps:
        raise refuse(
            wire.FINE_TUNE_STEPS,
            steps,
            f"the plan's fine-tune-steps is {plan.fine_tune_steps}: the run's noise "
            "was calibrated for no more",
        )
    return Checked(rid, rnd, total_rounds=total, fine_tune_steps=steps, floor=floor)


def _evaluate(cfg: Mapping[str, Any], rid: str, floor: int) -> Checked:
    """An evaluate request: its round, the post-processing rule, and the
    clinical calibration's stage with its out-of-distribution reference."""
    stage = integer(cfg, wire.CLINICAL_STAGE, 0, 2, required=False) or 0
    rule = integer(cfg, wire.POSTPROCESS, 0, len(CANDIDATES) - 1, required=False)
    mean = std = None
    if stage == 2:
        mean = float_list(cfg, wire.OOD_MEAN, wire.OOD_N_FEATURES)
        std = float_list(cfg, wire.OOD_STD, wire.OOD_N_FEATURES)
        # never sharper than the coordinator's own floor (common.ood): a
        # reference tight on one feature would turn the shares into a probe of
        # that one feature's values at the site
        if any(v < lo for v, lo in zip(std, STD_FLOOR, strict=True)):
            raise refuse(wire.OOD_STD, std, "a standard deviation is below its floor")
    return Checked(
        rid,
        round_number(cfg, required=False),
        floor=floor,
        clinical_stage=stage,
        postprocess=rule or 0,
        ood_mean=mean,
        ood_std=std,
    )


def float_list(cfg: Mapping[str, Any], key: str, length: int) -> tuple[float, ...]:
    """``cfg[key]`` as exactly ``length`` finite floats of magnitude at most 1e6."""
    value = cfg.get(key)
    if not isinstance(value, list) or len(value) != length:
        raise refuse(key, value, f"must be a list of {length} numbers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise refuse(key, v, "must hold numbers only")
        if not (math.isfinite(float(v)) and abs(float(v)) <= 1e6):
            raise refuse(key, v, "must hold finite numbers up to 1e6")
        out.append(float(v))
    return tuple(out)


# -- how many releases a run has asked for --------------------------------------
class QueryCounter:
    """Evaluate, fine-tune and query requests answered per run, at the site.

    Each such answer releases aggregates not covered by DP; repeated releases
    over the same patients can be differenced (docs/privacy.md), so a run gets
    at most ``privacy.max_queries_per_run`` of them. The count is taken before
    the work, under an exclusive lock, in ``<state_dir>/request-counts.json``
    (atomic writes), keyed by a hash of the run id.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / COUNTS_NAME
        self.lock_path = Path(state_dir) / (COUNTS_NAME + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield self._read()
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _read(self) -> dict:
        if not self.path.exists():
            return {}
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            doc = None
        if not isinstance(doc, dict):
            # a damaged count must not reset the allowance: refuse until fixed
            raise RequestRefused(
                "query-limit",
                f"{self.path} is unreadable; restore it from backup (a reset "
                "would give every run a new allowance)",
            )
        return doc

    def take(self, run: str, limit: int) -> int:
        """Count one more release for ``run``; refuse past ``limit``.

        Returns the count including this one.
        """
        key = run_key(run)
        with self._locked() as doc:
            entry = doc.get(key) if isinstance(doc.get(key), dict) else None
            used = int(entry.get("queries", 0)) if entry else 0
            if used >= limit:
                raise RequestRefused(
                    "query-limit",
                    f"run {run!r} has made {used} evaluate and query requests; "
                    f"the site allows {limit} (privacy.max_queries_per_run)",
                )
            doc[key] = {"run_id": run, "queries": used + 1}
            atomic_write_json(self.path, doc, indent=1, sort_keys=True)
        return used + 1

    def used(self, run: str) -> int:
        """Releases counted for ``run`` so far."""
        with self._locked() as doc:
            entry = doc.get(run_key(run))
            return int(entry.get("queries", 0)) if isinstance(entry, dict) else 0
