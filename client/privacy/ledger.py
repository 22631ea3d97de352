"""The site's privacy ledger: everything it has spent, and the budget check.

The site, not the coordinator, owns the budget. Every round's (noise multiplier,
sample rate, steps) is appended to a ledger in the site's state directory, written
atomically (:mod:`common.atomic`) with a checksum under an exclusive file lock,
and epsilon is always computed by one accountant (:mod:`client.privacy.accounting`)
over the *whole* history: across rounds, restarts and runs on the same site. The
budget check and the spend are one locked step (:meth:`PrivacyLedger.spend`),
taken before training starts, so two trainings at one site can never both pass
the ceiling.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from client.privacy.accounting import (
    ACCOUNTANT,
    ACCOUNTANTS,
    History,
    calibrate_noise,
    epsilon_for,
    poisson_schedule,
)
from client.privacy.entries import (
    Calibration,
    InvalidEntry,
    LedgerEntry,
    RunSchedule,
    SiteLimits,
    check_entry_values,
)
from client.request_refused import RequestRefused
from common.atomic import atomic_write_json

log = logging.getLogger(__name__)

# The entry types are re-exported: the ledger is where callers find them.
__all__ = [
    "BudgetExceeded",
    "Calibration",
    "InvalidEntry",
    "LedgerEntry",
    "LedgerError",
    "PrivacyLedger",
    "RunSchedule",
    "SiteLimits",
    "check_budget",
    "check_entry_values",
]

# Format 3 (issue 27): a run's calibration records the schedule it is bound to.
# Formats 1 (RDP) and 2 are read; their calibrations bind target and delta only.
LEDGER_FORMAT = "kidneyfl-privacy-ledger/3"
LEDGER_FORMATS_READ = (
    "kidneyfl-privacy-ledger/1",
    "kidneyfl-privacy-ledger/2",
    LEDGER_FORMAT,
)
LEDGER_NAME = "privacy-ledger.json"
LOCK_NAME = "privacy-ledger.lock"


class LedgerError(RuntimeError):
    """The ledger is unreadable or fails its checksum; the site must not train."""


class BudgetExceeded(RuntimeError):
    """The next round would take the site past its own epsilon ceiling."""


class PrivacyLedger:
    """Durable record of everything this site has spent.

    Parameters
    ----------
    state_dir : Path
        The site's state directory (from the site YAML).
    site : str
        Site name, stored in the file to catch a ledger copied between sites.

    Every change reloads the file under an exclusive lock (``privacy-ledger.lock``
    beside it), so processes that share a state directory see each other's
    spends: one ledger, one writer at a time.
    """

    def __init__(self, state_dir: Path, site: str) -> None:
        self.path = Path(state_dir) / LEDGER_NAME
        self.lock_path = Path(state_dir) / LOCK_NAME
        self.site = site
        self.accountant = ACCOUNTANT
        self.entries: list[LedgerEntry] = []
        self.calibrations: dict[str, Calibration] = {}
        # run id -> rounds spent on whose update the coordinator did not use
        self.unused: dict[str, list[int]] = {}
        self._load()

    # -- persistence ---------------------------------------------------------
    def _payload(self) -> dict:
        return {
            "format": LEDGER_FORMAT,
            "site": self.site,
            "accountant": self.accountant,
            "calibrations": {
                k: asdict(v) for k, v in sorted(self.calibrations.items())
            },
            "entries": [asdict(e) for e in self.entries],
            "unused": {k: sorted(v) for k, v in sorted(self.unused.items())},
        }

    @staticmethod
    def _digest(payload: dict) -> str:
        canon = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def _load(self) -> None:
        self.accountant, self.entries, self.calibrations = ACCOUNTANT, [], {}
        self.unused = {}
        if not self.path.exists():
            return
        try:
            doc = self._checked(json.loads(self.path.read_text()))
            self.accountant = doc.get("accountant", "rdp")  # format 1: RDP
            self.entries = self._entries(doc["entries"])
            self.calibrations = {
                k: Calibration(**v) for k, v in doc["calibrations"].items()
            }
            self.unused = {  # absent before the key existed
                str(k): [int(r) for r in v] for k, v in doc.get("unused", {}).items()
            }
        except LedgerError:
            raise
        except OSError as exc:
            raise LedgerError(
                f"{self.path}: cannot be read ({exc.strerror or type(exc).__name__});"
                " check the file's permissions and that state_dir is this site's own "
                "directory"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LedgerError(
                f"{self.path}: unreadable or truncated ({type(exc).__name__}); "
                f"{self._fix}"
            ) from None

    def _entries(self, raw: list) -> list[LedgerEntry]:
        """The recorded entries; one that could lower the total is an error."""
        out = []
        for i, e in enumerate(raw):
            try:
                out.append(LedgerEntry(**e))
            except InvalidEntry as exc:
                raise LedgerError(
                    f"{self.path}: entry {i + 1} is not a DP-SGD round ({exc}); an "
                    "entry like it would lower the epsilon the site has spent, so "
                    f"the site does not train. {self._fix}"
                ) from None
        return out

    @property
    def _fix(self) -> str:
        return (
            f"restore {self.path} from the site's backup; never delete it, or the "
            "site would lose the record of privacy already spent"
        )

    def _checked(self, doc: dict) -> dict:
        """``doc`` without its checksum, once format, checksum, site and
        accountant are what this site wrote."""
        if not isinstance(doc, dict) or "sha256" not in doc:
            raise LedgerError(f"{self.path}: not a kidneyfl ledger; {self._fix}")
        digest = doc.pop("sha256")
        if doc.get("format") not in LEDGER_FORMATS_READ:
            raise LedgerError(f"{self.path}: unknown ledger format; {self._fix}")
        if self._digest(doc) != digest:
            raise LedgerError(
                f"{self.path}: checksum mismatch, the ledger was altered or "
                f"damaged; {self._fix}"
            )
        if doc["site"] != self.site:
            raise LedgerError(
                f"{self.path}: ledger belongs to site {doc['site']!r}, not "
                f"{self.site!r}; point state_dir at this site's own directory"
            )
        if doc.get("accountant", "rdp") not in ACCOUNTANTS:
            raise LedgerError(f"{self.path}: unknown accountant; {self._fix}")
        return doc

    def _save(self) -> None:
        payload = self._payload()
        payload["sha256"] = self._digest(payload)
        atomic_write_json(self.path, payload, indent=1, sort_keys=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[PrivacyLedger]:
        """Hold the ledger's exclusive lock, with the file freshly reloaded.

        Changes made inside are saved before the lock is released.
        """
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                self._load()
                yield self
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    # -- accounting ----------------------------------------------------------
    def history(self) -> History:
        """The accountant's history over every run and round recorded."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon spent by this site, at ``delta``."""
        return epsilon_for(self.history(), delta, self.accountant)

    def epsilon_after(
        self, delta: float, noise: float, sample_rate: float, steps: int
    ) -> float:
        """Cumulative epsilon if one more round of ``steps`` steps were run."""
        return epsilon_for(
            self.history() + [(noise, sample_rate, steps)], delta, self.accountant
        )

    def calibrate(
        self,
        run_id: str,
        target_epsilon: float,
        delta: float,
        n_cases: int,
        batch_size: int,
        total_epochs: int,
        extra_steps: int = 0,
    ) -> Calibration:
        """The run's noise: reused if this run was calibrated before, else new.

        ``extra_steps`` are steps the run takes beyond its epochs (per-site
        fine-tuning of the final model), so they fit in the same target.
        """
        with self.locked():
            if run_id in self.calibrations:
                return self.calibrations[run_id]
            q, steps_per_epoch = poisson_schedule(n_cases, batch_size)
            planned = steps_per_epoch * total_epochs + extra_steps
            noise = calibrate_noise(target_epsilon, delta, q, planned, self.accountant)
            cal = Calibration(run_id, target_epsilon, delta, q, planned, noise)
            self.calibrations[run_id] = cal
            self._save()
        log.info(
            "calibrated noise %.4f for target epsilon %.3g at delta %.3g over %d "
            "steps (%s accountant)",
            noise,
            target_epsilon,
            delta,
            planned,
            self.accountant,
        )
        return cal

    def record(self, entry: LedgerEntry) -> None:
        """Append one round and persist atomically, under the lock."""
        with self.locked():
            self.entries.append(entry)
            self._save()

    def spend(
        self,
        entry: LedgerEntry,
        max_epsilon: float,
        delta: float,
        target_epsilon: float,
    ) -> float:
        """Check the budget and record ``entry`` as one locked step.

        Called *before* training: the spend is on record whatever happens next,
        and a second training started at the same time sees it. Returns the
        cumulative epsilon after the entry.

        Raises
        ------
        BudgetExceeded
            If the plan's target or the entry would pass ``max_epsilon``.
        """
        with self.locked():
            after = check_budget(
                self,
                self.site,
                max_epsilon,
                delta,
                target_epsilon,
                entry.noise_multiplier,
                entry.sample_rate,
                entry.steps,
            )
            self.entries.append(entry)
            self._save()
        return after

    def spend_round(
        self,
        run_id: str,
        schedule: RunSchedule,
        limits: SiteLimits,
        n_cases: int,
        round_: int,
        steps: int,
        dataset: str,
    ) -> tuple[Calibration, float]:
        """Calibrate (or verify) the run's noise and spend one round: one locked step.

        Everything is checked before anything is written, and the calibration
        and the entry are saved together, so a refused round leaves the ledger
        exactly as it was. In order:

        1. the plan's target against the site's ceiling and per-run limit;
        2. a run id seen before must come with the schedule it was calibrated
           for; a new one is calibrated for its whole schedule, its noise raised
           to the site's floor if it comes out lower;
        3. the run may not take more steps than its calibration planned;
        4. the entry itself (steps at least 1, noise above 0, rate in (0, 1]);
        5. the cumulative epsilon after it against the ceiling, and this run's
           own epsilon against the per-run limit.

        Returns the run's calibration and the cumulative epsilon after the round.

        Raises
        ------
        BudgetExceeded
            The target or the round passes ``limits.max_epsilon``.
        RequestRefused
            ``limit-exceeded`` (per-run epsilon, planned steps, noise floor) or
            ``request-invalid`` (a run id reused with another schedule).
        InvalidEntry
            Values no DP-SGD round has.
        """
        delta = schedule.delta
        with self.locked():
            if schedule.target_epsilon > limits.max_epsilon:
                check_budget(
                    self,
                    self.site,
                    limits.max_epsilon,
                    delta,
                    schedule.target_epsilon,
                    1.0,
                    1.0,
                    1,
                )  # raises
            if schedule.target_epsilon > limits.run_epsilon:
                raise RequestRefused(
                    "limit-exceeded",
                    f"the plan asks for epsilon {schedule.target_epsilon:g} in one "
                    f"run; this site allows at most {limits.run_epsilon:g} per run "
                    "(privacy.max_epsilon_per_run)",
                )
            cal = self._run_calibration(run_id, schedule, limits, n_cases)
            if cal.noise_multiplier < limits.min_noise:
                raise RequestRefused(
                    "limit-exceeded",
                    f"run {run_id!r} was calibrated to noise "
                    f"{cal.noise_multiplier:.4g}, below the site's floor "
                    f"{limits.min_noise:g} (privacy.min_noise_multiplier); start a "
                    "new run",
                )
            run_steps = sum(e.steps for e in self.entries if e.run_id == run_id)
            if run_steps + steps > cal.planned_steps:
                raise RequestRefused(
                    "limit-exceeded",
                    f"run {run_id!r} has run {run_steps} of the {cal.planned_steps} "
                    f"steps its noise was calibrated for; {steps} more would pass "
                    "them",
                )
            q, _ = poisson_schedule(n_cases, schedule.batch_size)
            entry = LedgerEntry(run_id, round_, cal.noise_multiplier, q, steps, dataset)
            after = check_budget(
                self,
                self.site,
                limits.max_epsilon,
                delta,
                schedule.target_epsilon,
                entry.noise_multiplier,
                entry.sample_rate,
                entry.steps,
            )
            run_hist = [
                (e.noise_multiplier, e.sample_rate, e.steps)
                for e in self.entries
                if e.run_id == run_id
            ]
            run_eps = (
                after  # the run is the whole ledger: the same history
                if len(run_hist) == len(self.entries)
                else epsilon_for(
                    run_hist + [(entry.noise_multiplier, q, steps)],
                    delta,
                    self.accountant,
                )
            )
            if run_eps > limits.run_epsilon:
                raise RequestRefused(
                    "limit-exceeded",
                    f"run {run_id!r} would reach epsilon {run_eps:.3f}, past the "
                    f"site's per-run limit {limits.run_epsilon:g}",
                )
            self.calibrations[run_id] = cal
            self.entries.append(entry)
            self._save()
        return cal, after

    def _run_calibration(
        self, run_id: str, schedule: RunSchedule, limits: SiteLimits, n_cases: int
    ) -> Calibration:
        """The run's calibration: the recorded one if its schedule matches, else new.

        Not saved here: :meth:`spend_round` saves it with the round's entry.
        """
        bound = asdict(schedule)
        cal = self.calibrations.get(run_id)
        if cal is not None:
            same = (
                cal.schedule == bound
                if cal.schedule is not None
                else (cal.target_epsilon, cal.delta)
                == (schedule.target_epsilon, schedule.delta)
            )
            if not same:
                raise RequestRefused(
                    "request-invalid",
                    f"run {run_id!r} was calibrated for {cal.schedule or 'another'} "
                    f"schedule; this request asks for {bound}: a run id keeps the "
                    "schedule it was calibrated for",
                )
            return cal
        q, per_epoch = poisson_schedule(n_cases, schedule.batch_size)
        planned = (
            per_epoch * schedule.total_rounds * schedule.local_epochs
            + schedule.fine_tune_steps
        )
        noise = calibrate_noise(
            schedule.target_epsilon, schedule.delta, q, planned, self.accountant
        )
        if noise < limits.min_noise:
            log.warning(
                "calibrated noise %.4f for run %s is below the site's floor %g; "
                "using the floor (more noise: less epsilon than the target)",
                noise,
                run_id,
                limits.min_noise,
            )
            noise = limits.min_noise
        log.info(
            "calibrated noise %.4f for target epsilon %.3g at delta %.3g over %d "
            "steps (%s accountant)",
            noise,
            schedule.target_epsilon,
            schedule.delta,
            planned,
            self.accountant,
        )
        return Calibration(
            run_id, schedule.target_epsilon, schedule.delta, q, planned, noise, bound
        )

    def mark_unused(self, run_id: str, rounds: list[int]) -> list[int]:
        """Record that the coordinator did not use this site's update of
        ``rounds`` of ``run_id``: spent, not used. Returns the rounds newly
        marked.

        Only rounds this ledger spent on in that run are marked, and a mark is
        never removed: it changes no epsilon (what was spent stays spent); it
        tells the site which spends bought nothing. Saved under the lock.
        """
        with self.locked():
            spent = {e.round for e in self.entries if e.run_id == run_id}
            have = set(self.unused.get(run_id, []))
            new = sorted({r for r in rounds if r in spent} - have)
            if new:
                self.unused[run_id] = sorted(have | set(new))
                self._save()
        return new

    def runs_summary(self, delta: float) -> list[dict]:
        """Per run: rounds, steps and the epsilon that run alone would have spent."""
        out: dict[str, dict] = {}
        for e in self.entries:
            r = out.setdefault(
                e.run_id, {"run_id": e.run_id, "rounds": 0, "steps": 0, "hist": []}
            )
            r["rounds"] += 1
            r["steps"] += e.steps
            r["hist"].append((e.noise_multiplier, e.sample_rate, e.steps))
            r["noise_multiplier"] = e.noise_multiplier
            r["last_time"] = e.time
        for r in out.values():
            r["epsilon_alone"] = epsilon_for(r.pop("hist"), delta, self.accountant)
            r["unused_rounds"] = list(self.unused.get(r["run_id"], []))
        return list(out.values())


def check_budget(
    ledger: PrivacyLedger,
    site: str,
    max_epsilon: float,
    delta: float,
    target_epsilon: float,
    noise_multiplier: float,
    sample_rate: float,
    round_steps: int,
) -> float:
    """Refuse a round that would pass the site's ceiling; return epsilon after it.

    Raises
    ------
    BudgetExceeded
        With both numbers in the message.
    """
    if target_epsilon > max_epsilon:
        raise BudgetExceeded(
            f"site {site}: the plan asks for epsilon {target_epsilon:g} but this site "
            f"allows at most {max_epsilon:g} (privacy.max_epsilon); lower the plan's "
            "dp-target-epsilon"
        )
    after = ledger.epsilon_after(delta, noise_multiplier, sample_rate, round_steps)
    if after > max_epsilon:
        spent = ledger.epsilon(delta)
        raise BudgetExceeded(
            f"site {site}: this round would bring epsilon from {spent:.3f} to "
            f"{after:.3f}, past the site's ceiling {max_epsilon:g} at delta {delta:g}"
        )
    return after
