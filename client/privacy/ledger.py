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
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from client.privacy.accounting import (
    ACCOUNTANT,
    ACCOUNTANTS,
    History,
    calibrate_noise,
    epsilon_for,
    poisson_schedule,
)
from common.atomic import atomic_write_json

log = logging.getLogger(__name__)

LEDGER_FORMAT = "kidneyfl-privacy-ledger/2"
LEDGER_FORMATS_READ = ("kidneyfl-privacy-ledger/1", LEDGER_FORMAT)
LEDGER_NAME = "privacy-ledger.json"
LOCK_NAME = "privacy-ledger.lock"


class LedgerError(RuntimeError):
    """The ledger is unreadable or fails its checksum; the site must not train."""


class BudgetExceeded(RuntimeError):
    """The next round would take the site past its own epsilon ceiling."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round of DP-SGD as the accountant needs it, plus provenance."""

    run_id: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    dataset: str
    time: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Calibration:
    """The noise a run uses, fixed at its first round for all its rounds."""

    run_id: str
    target_epsilon: float
    delta: float
    sample_rate: float
    planned_steps: int
    noise_multiplier: float


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
        }

    @staticmethod
    def _digest(payload: dict) -> str:
        canon = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def _load(self) -> None:
        self.accountant, self.entries, self.calibrations = ACCOUNTANT, [], {}
        if not self.path.exists():
            return
        try:
            doc = self._checked(json.loads(self.path.read_text()))
            self.accountant = doc.get("accountant", "rdp")  # format 1: RDP
            self.entries = [LedgerEntry(**e) for e in doc["entries"]]
            self.calibrations = {
                k: Calibration(**v) for k, v in doc["calibrations"].items()
            }
        except LedgerError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"{self.path}: unreadable or truncated ({type(exc).__name__}); "
                f"{self._fix}"
            ) from None

    @property
    def _fix(self) -> str:
        return (
            f"restore {self.path} from the site's backup; never delete it, or the "
            "site would lose the record of privacy already spent"
        )

    def _checked(self, doc: dict) -> dict:
        """``doc`` without its checksum, once format, checksum, site and
        accountant are what this site wrote."""
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
