import json

import pytest
import torch
from dp_accounting import dp_event, pld, rdp

from client.privacy.accounting import calibrate_noise, epsilon_for, poisson_schedule
from client.privacy.dpsgd import DPSpec
from client.privacy.ledger import (
    BudgetExceeded,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    check_budget,
)
from client.train import local_train

# Opacus' RDP orders, used for the independent RDP accountant too.
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def _events(history):
    for noise, q, steps in history:
        yield dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(noise)), steps


def google_rdp(history, delta: float) -> float:
    acc = rdp.RdpAccountant(orders=ORDERS)
    for event, steps in _events(history):
        acc.compose(event, steps)
    return acc.get_epsilon(delta)


def google_pld(history, delta: float) -> float:
    """dp-accounting's PLD accountant: tight, and an upper bound (pessimistic)."""
    acc = pld.PLDAccountant(value_discretization_interval=1e-4)
    for event, steps in _events(history):
        acc.compose(event, steps)
    return acc.get_epsilon(delta)


HISTORIES = [
    # the demo's history: 5 rounds x 2 epochs x 4 steps at q 0.25
    ([(0.9976, 0.25, 8)] * 5, 1e-3),
    ([(0.8, 0.1, 300)], 1e-5),
    ([(2.0, 1.0, 15)], 1e-3),
    # two runs with different noise and sample rates, rounds interleaved
    ([(1.1, 0.25, 8), (1.4, 0.2, 10)] * 3 + [(1.1, 0.25, 8)], 1e-3),
    ([(1.3, 0.004, 6000)], 1e-5),
]


@pytest.mark.parametrize("history, delta", HISTORIES)
def test_ledger_epsilon_is_tight_and_never_below_pld(tmp_path, history, delta):
    ledger = PrivacyLedger(tmp_path, "h1")
    for r, (noise, q, steps) in enumerate(history, 1):
        ledger.record(LedgerEntry("run", r, noise, q, steps, "fp"))
    ours = ledger.epsilon(delta)
    tight = google_pld(history, delta)
    assert ours >= tight * (1 - 1e-3)  # never more than 0.1% below
    assert ours <= tight * 1.01  # and within 1%
    # and tighter than RDP, which the ledger used before
    assert ours < google_rdp(history, delta)


def test_demo_history_spends_less_than_rdp_said():
    """At the demo's noise (RDP-calibrated for epsilon 8), the tight accountant
    reports about 6.9: the budget the old accountant wasted."""
    history = [(1.0876, 0.25, 40)]
    assert epsilon_for(history, 1e-3, accountant="rdp") == pytest.approx(8.0, abs=0.02)
    assert epsilon_for(history, 1e-3) == pytest.approx(6.9, abs=0.05)


def test_rdp_ledgers_still_match_an_independent_rdp_accountant():
    for noise, q, steps, delta in [(1.0, 0.25, 40, 1e-3), (1.3, 0.004, 6000, 1e-5)]:
        ours = epsilon_for([(noise, q, steps)], delta, accountant="rdp")
        assert ours == pytest.approx(google_rdp([(noise, q, steps)], delta), rel=0.01)


def test_history_composes_not_sums(tmp_path):
    ledger = PrivacyLedger(tmp_path, "h1")
    for r in range(1, 4):
        ledger.record(LedgerEntry("run-a", r, 1.0, 0.25, 8, "fp"))
    whole = google_pld([(1.0, 0.25, 24)], 1e-3)
    assert ledger.epsilon(1e-3) == pytest.approx(whole, rel=0.01)
    assert ledger.epsilon(1e-3) < 3 * epsilon_for([(1.0, 0.25, 8)], 1e-3)


def test_calibration_meets_target_over_the_whole_plan():
    q, spe = poisson_schedule(n_cases=30, batch_size=8)
    assert (q, spe) == (0.25, 4)
    noise = calibrate_noise(5.0, 1e-3, q, spe * 12)
    spent = epsilon_for([(noise, q, spe * 12)], 1e-3)
    assert 5.0 * 0.99 <= spent <= 5.0  # meets the target, never passes it
    assert google_pld([(noise, q, spe * 12)], 1e-3) <= 5.0 * 1.001
    # less noise than the RDP accountant needed for the same promise
    assert noise < calibrate_noise(5.0, 1e-3, q, spe * 12, accountant="rdp")


def test_format_1_ledgers_keep_the_rdp_accountant(tmp_path):
    ledger = PrivacyLedger(tmp_path, "h1")
    ledger.record(LedgerEntry("r", 1, 1.0, 0.25, 40, "fp"))
    doc = json.loads(ledger.path.read_text())
    doc.pop("sha256")
    doc["format"] = "kidneyfl-privacy-ledger/1"
    doc.pop("accountant")
    doc["sha256"] = PrivacyLedger._digest(doc)
    ledger.path.write_text(json.dumps(doc))
    old = PrivacyLedger(tmp_path, "h1")
    assert old.accountant == "rdp"
    assert old.epsilon(1e-3) == pytest.approx(
        google_rdp([(1.0, 0.25, 40)], 1e-3), rel=0.01
    )
    old.record(LedgerEntry("r", 2, 1.0, 0.25, 8, "fp"))
    assert json.loads(old.path.read_text())["accountant"] == "rdp"


def test_ledger_survives_restart_and_next_run_continues(tmp_path):
    first = PrivacyLedger(tmp_path, "h1")
    cal = first.calibrate("run-a", 4.0, 1e-3, n_cases=20, batch_size=5, total_epochs=4)
    first.record(
        LedgerEntry("run-a", 1, cal.noise_multiplier, cal.sample_rate, 4, "fp")
    )
    spent = first.epsilon(1e-3)
    # A new process (a restart) reads the same state directory.
    again = PrivacyLedger(tmp_path, "h1")
    assert again.epsilon(1e-3) == pytest.approx(spent)
    assert again.calibrate("run-a", 4.0, 1e-3, 20, 5, 4) == cal  # same run, same noise
    again.record(
        LedgerEntry("run-b", 1, cal.noise_multiplier, cal.sample_rate, 4, "fp")
    )
    assert PrivacyLedger(tmp_path, "h1").epsilon(1e-3) > spent


def test_refuses_past_ceiling_and_names_both_numbers(tmp_path):
    ledger = PrivacyLedger(tmp_path, "h1")
    cal = ledger.calibrate("r", 2.0, 1e-3, 20, 5, 2)
    with pytest.raises(BudgetExceeded, match=r"epsilon 2.*at most 1\b"):
        check_budget(
            ledger, "h1", 1.0, 1e-3, 2.0, cal.noise_multiplier, cal.sample_rate, 4
        )
    eps = check_budget(
        ledger, "h1", 3.0, 1e-3, 2.0, cal.noise_multiplier, cal.sample_rate, 4
    )
    ledger.record(LedgerEntry("r", 1, cal.noise_multiplier, cal.sample_rate, 4, "fp"))
    ledger.record(LedgerEntry("r", 2, cal.noise_multiplier, cal.sample_rate, 4, "fp"))
    assert eps < 3.0
    with pytest.raises(BudgetExceeded, match="past the site's ceiling 2.1"):
        check_budget(
            ledger, "h1", 2.1, 1e-3, 2.0, cal.noise_multiplier, cal.sample_rate, 4
        )


@pytest.mark.parametrize("damage", ["tamper", "truncate", "garbage"])
def test_damaged_ledger_is_detected_never_reset(tmp_path, damage):
    ledger = PrivacyLedger(tmp_path, "h1")
    ledger.record(LedgerEntry("r", 1, 1.0, 0.25, 8, "fp"))
    path = ledger.path
    if damage == "tamper":
        doc = json.loads(path.read_text())
        doc["entries"][0]["steps"] = 1  # someone tries to make the past cheaper
        path.write_text(json.dumps(doc))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        path.write_text("not json")
    with pytest.raises(LedgerError, match="privacy-ledger.json"):
        PrivacyLedger(tmp_path, "h1")


def test_ledger_of_another_site_is_refused(tmp_path):
    PrivacyLedger(tmp_path, "h1").record(LedgerEntry("r", 1, 1.0, 0.25, 8, "fp"))
    with pytest.raises(LedgerError, match="belongs to site 'h1'"):
        PrivacyLedger(tmp_path, "h2")


class _Toy(torch.utils.data.Dataset):
    def __init__(self, n: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g) * 10
        self.y = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _train(model, seed, dp, lr=0.1, opt="sgd"):
    return local_train(
        model,
        _Toy(),
        torch.nn.CrossEntropyLoss(),
        epochs=1,
        batch_size=8,
        learning_rate=lr,
        optimizer=opt,
        device=torch.device("cpu"),
        seed=seed,
        dp=dp,
    )


def test_per_sample_gradients_are_clipped():
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    data = _Toy()
    for i in range(len(data)):
        model = GradSampleModule(torch.nn.Linear(4, 2))
        opt = DPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            noise_multiplier=0.0,
            max_grad_norm=1.0,
            expected_batch_size=1,
        )
        loss = torch.nn.CrossEntropyLoss()(model(data.x[i : i + 1]), data.y[i : i + 1])
        loss.backward()
        raw = torch.cat([p.grad_sample.flatten() for p in model.parameters()]).norm()
        opt.clip_and_accumulate()
        clipped = torch.cat(
            [p.summed_grad.flatten() for p in model.parameters()]
        ).norm()
        assert clipped <= 1.0 + 1e-5
        if raw > 1.0:  # large inputs make most raw gradients exceed the bound
            assert clipped == pytest.approx(1.0, rel=1e-4)


def test_noise_is_added_and_zero_noise_without_clipping_matches_plain():
    base = torch.nn.Linear(4, 2)
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    for m in (a, b):
        m.load_state_dict(base.state_dict())
    _train(a, seed=1, dp=DPSpec(1.0, 1.0, "hooks"))
    _train(b, seed=2, dp=DPSpec(1.0, 1.0, "hooks"))
    assert not torch.allclose(a.weight, b.weight)  # different noise draws
    # noise 0 and a clipping bound no gradient reaches = non-private update,
    # when the Poisson draw includes every sample (q = 1, batch = all).
    c, d = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    for m in (c, d):
        m.load_state_dict(base.state_dict())
    _train(c, seed=3, dp=DPSpec(0.0, 1e9, "hooks"))
    _train(d, seed=3, dp=None)
    assert torch.allclose(c.weight, d.weight, atol=1e-5)


def test_ledger_survives_sigkill_mid_writes(tmp_path):
    """A site process killed at any moment leaves a ledger that loads and
    holds every round it finished recording (atomic replace, never torn)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys\n"
        "from client.privacy.ledger import LedgerEntry, PrivacyLedger\n"
        "led = PrivacyLedger(sys.argv[1], 'h1')\n"
        "for r in range(1, 100000):\n"
        "    led.record(LedgerEntry('run', r, 1.0, 0.25, 8, 'fp'))\n"
        "    print(r, flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    done = 0
    deadline = time.monotonic() + 60
    while done < 30 and time.monotonic() < deadline:
        done = int(proc.stdout.readline() or done)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ledger = PrivacyLedger(tmp_path, "h1")
    rounds = [e.round for e in ledger.entries]
    assert rounds == list(range(1, len(rounds) + 1))
    assert len(rounds) >= done >= 30
