"""Sample-level differential privacy at the site: DP-SGD and the privacy ledger.

The site, not the coordinator, owns the budget. Every round's (noise multiplier,
sample rate, steps) is appended to a ledger in the site's state directory, written
atomically with a checksum, and epsilon is always computed by Opacus' RDP
accountant over the *whole* history: across rounds, restarts and runs on the same
site. Before a round the site computes what it would spend and refuses if that
passes its own ceiling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

log = logging.getLogger(__name__)

LEDGER_FORMAT = "kidneyfl-privacy-ledger/1"
LEDGER_NAME = "privacy-ledger.json"


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


def epsilon_for(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a DP-SGD history ``[(noise, sample_rate, steps), ...]`` (RDP)."""
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, steps: int
) -> float:
    """Noise multiplier so that ``steps`` steps at ``sample_rate`` reach the target.

    Calibrated for the steps actually run over the whole plan (rounds x local
    epochs x steps per epoch), not per round.
    """
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant="rdp",
            epsilon_tolerance=0.005,
        )
    )


def poisson_schedule(n_cases: int, batch_size: int) -> tuple[float, int]:
    """Sample rate and steps per epoch, exactly as Opacus' DPDataLoader runs them."""
    steps = max(1, math.ceil(n_cases / batch_size))
    return 1.0 / steps, steps


class PrivacyLedger:
    """Durable record of everything this site has spent.

    Parameters
    ----------
    state_dir : Path
        The site's state directory (from the site YAML).
    site : str
        Site name, stored in the file to catch a ledger copied between sites.
    """

    def __init__(self, state_dir: Path, site: str) -> None:
        self.path = Path(state_dir) / LEDGER_NAME
        self.site = site
        self.entries: list[LedgerEntry] = []
        self.calibrations: dict[str, Calibration] = {}
        self._load()

    # -- persistence ---------------------------------------------------------
    def _payload(self) -> dict:
        return {
            "format": LEDGER_FORMAT,
            "site": self.site,
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
        if not self.path.exists():
            return
        fix = (
            f"restore {self.path} from the site's backup; never delete it, or the "
            "site would lose the record of privacy already spent"
        )
        try:
            doc = json.loads(self.path.read_text())
            digest = doc.pop("sha256")
            if doc.get("format") != LEDGER_FORMAT:
                raise LedgerError(f"{self.path}: unknown ledger format; {fix}")
            if self._digest(doc) != digest:
                raise LedgerError(
                    f"{self.path}: checksum mismatch, the ledger was altered or "
                    f"damaged; {fix}"
                )
            if doc["site"] != self.site:
                raise LedgerError(
                    f"{self.path}: ledger belongs to site {doc['site']!r}, not "
                    f"{self.site!r}; point state_dir at this site's own directory"
                )
            self.entries = [LedgerEntry(**e) for e in doc["entries"]]
            self.calibrations = {
                k: Calibration(**v) for k, v in doc["calibrations"].items()
            }
        except LedgerError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise LedgerError(
                f"{self.path}: unreadable or truncated ({type(exc).__name__}); {fix}"
            ) from None

    def _save(self) -> None:
        payload = self._payload()
        payload["sha256"] = self._digest(payload)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(payload, fh, indent=1, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- accounting ----------------------------------------------------------
    def history(self) -> list[tuple[float, float, int]]:
        """The accountant's history over every run and round recorded."""
        return [(e.noise_multiplier, e.sample_rate, e.steps) for e in self.entries]

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon spent by this site, at ``delta``."""
        return epsilon_for(self.history(), delta)

    def epsilon_after(
        self, delta: float, noise: float, sample_rate: float, steps: int
    ) -> float:
        """Cumulative epsilon if one more round of ``steps`` steps were run."""
        return epsilon_for(self.history() + [(noise, sample_rate, steps)], delta)

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
        if run_id in self.calibrations:
            return self.calibrations[run_id]
        q, steps_per_epoch = poisson_schedule(n_cases, batch_size)
        planned = steps_per_epoch * total_epochs + extra_steps
        noise = calibrate_noise(target_epsilon, delta, q, planned)
        cal = Calibration(run_id, target_epsilon, delta, q, planned, noise)
        self.calibrations[run_id] = cal
        self._save()
        log.info(
            "calibrated noise %.4f for target epsilon %.3g at delta %.3g over %d steps",
            noise,
            target_epsilon,
            delta,
            planned,
        )
        return cal

    def record(self, entry: LedgerEntry) -> None:
        """Append one round and persist atomically (before any reply is sent)."""
        self.entries.append(entry)
        self._save()

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
            r["epsilon_alone"] = epsilon_for(r.pop("hist"), delta)
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


def make_private(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: torch.utils.data.DataLoader,
    noise_multiplier: float,
    max_grad_norm: float,
    grad_sample_mode: str,
) -> tuple:
    """Wrap model, optimiser and loader for DP-SGD with Poisson sampling.

    Returns ``(model, optimizer, loader)``. The engine's own accountant is not
    used for claims: the ledger composes the whole history instead.
    """
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp")
    return engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=grad_sample_mode,
    )
