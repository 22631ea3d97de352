"""DP noise and Poisson sampling come from the site's own entropy (issue 17).

The coordinator knows the plan, its seed, the round and the site's name. None
of these may let it reproduce a site's noise or its sampled patients, so these
tests train twice with *everything* the coordinator knows held equal and check
that the noise does not repeat, does not cancel between neighbouring datasets,
and has the scale the accountant assumes.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from client.privacy.dpsgd import DPSpec, make_private
from client.privacy.ledger import BudgetExceeded, LedgerEntry, PrivacyLedger
from client.train import local_train

N_IN, N_OUT = 16, 8  # 136 parameters: norms concentrate, tests do not flake


class _Patients(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)  # the data are fixed, not the noise
        self.x = torch.randn(n, N_IN, generator=g)
        self.y = torch.randint(0, N_OUT, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _one_step(data, noise: float, clip: float = 1.0, seed: int = 7) -> torch.Tensor:
    """Parameters after one DP-SGD step with the whole dataset in one batch
    (q = 1, so Poisson sampling takes every patient) from fixed weights."""
    torch.manual_seed(0)
    model = torch.nn.Linear(N_IN, N_OUT)
    local_train(
        model,
        data,
        torch.nn.CrossEntropyLoss(),
        epochs=1,
        batch_size=len(data),
        learning_rate=1.0,
        optimizer="sgd",  # the first SGD step with momentum moves by lr x grad
        device=torch.device("cpu"),
        seed=seed,  # everything the coordinator could know is the same
        dp=DPSpec(noise, clip, "hooks"),
    )
    return _flat(model)


def test_same_plan_seed_and_data_give_different_dp_updates():
    a = _one_step(_Patients(8), noise=1.0)
    b = _one_step(_Patients(8), noise=1.0)
    expected = 1.0 * 1.0 / 8 * (2 * a.numel()) ** 0.5  # norm of n1 - n2
    assert (a - b).norm() > 0.5 * expected


def test_neighbouring_datasets_do_not_cancel_the_noise():
    """The coordinator's experiment: same plan and seed, one patient removed,
    subtract the two updates. With noise it could reproduce, the difference
    would be the removed patient's clipped gradient plus a sliver of noise
    (the two batch sizes scale the same draws differently)."""
    sigma, clip = 10.0, 1.0
    with_p = _one_step(_Patients(8), noise=sigma, clip=clip)
    without = _one_step(torch.utils.data.Subset(_Patients(8), range(7)), sigma, clip)
    # independent noise: std sigma*C/8 and sigma*C/7 per coordinate
    noise_norm = sigma * clip * (1 / 8**2 + 1 / 7**2) ** 0.5 * with_p.numel() ** 0.5
    data_part = 2 * clip  # at most: the clipped sums differ by one patient
    diff = (with_p - without).norm()
    assert diff > 0.7 * noise_norm > 5 * data_part
    # reproducible draws would leave |1/8 - 1/7| sigma C per coordinate: 0.13x
    assert diff > 3 * sigma * clip * (1 / 7 - 1 / 8) * with_p.numel() ** 0.5


def test_noise_has_the_scale_the_accountant_assumes():
    """std of the added noise = noise_multiplier x clipping norm / expected batch,
    measured as the difference from the same step without noise (q = 1: the
    batch is the whole dataset, so only the noise differs)."""
    sigma, clip, n = 2.0, 1.0, 8
    data = _Patients(n)
    clean = _one_step(data, noise=0.0, clip=clip)
    draws = torch.cat([_one_step(data, sigma, clip) - clean for _ in range(20)])
    expected = sigma * clip / n
    # 2720 draws: the std's standard error is 1.4 %; 6 % is 4.4 of them (a
    # wrong scale, e.g. noise / batch^2 or a lost factor 2, is off by far more)
    assert draws.std().item() == pytest.approx(expected, rel=0.06)
    assert abs(draws.mean().item()) < 4 * expected / draws.numel() ** 0.5
    # Gaussian tails, not a bounded or lattice distribution: about 4.6 % of
    # draws beyond 2 std (the secure sampler averages four Gaussians)
    beyond = (draws.abs() > 2 * expected).float().mean().item()
    assert 0.03 < beyond < 0.065


def test_poisson_sampling_is_not_reproducible_from_the_seed():
    """Two DP loaders built from identically seeded loaders draw different
    patients: the sampler's generator is the site's, not the loader's."""

    class _Index(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int):
            return torch.tensor([float(i)]), torch.tensor(0)

    def draws() -> list[list[int]]:
        model = torch.nn.Linear(1, 2)
        loader = torch.utils.data.DataLoader(
            _Index(), batch_size=32, generator=torch.Generator().manual_seed(3)
        )
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        _, _, dp_loader = make_private(model, opt, loader, 1.0, 1.0, "hooks")
        return [sorted(int(v) for v in x.flatten()) for x, _ in dp_loader]

    first, second = draws(), draws()
    assert len(first) == len(second) == 2  # q = 1/2, two steps per epoch
    assert first != second  # equal by chance with probability 2^-128


def _spend_once(state_dir: str, barrier, results) -> None:
    ledger = PrivacyLedger(Path(state_dir), "h1")
    barrier.wait()
    try:
        ledger.spend(LedgerEntry("run", 1, 1.0, 0.25, 40, "fp"), 10.0, 1e-3, 8.0)
        results.put("spent")
    except BudgetExceeded:
        results.put("refused")


def test_two_trainings_at_once_cannot_both_pass_the_ceiling(tmp_path):
    """One round costs about 5.6 at delta 1e-3 (noise 1, q 0.25, 40 steps); the
    ceiling is 10, so one of two racing rounds fits and the other must not,
    however the two processes interleave."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_spend_once, args=(str(tmp_path), barrier, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    outcome = sorted(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcome == ["refused", "spent"]
    ledger = PrivacyLedger(tmp_path, "h1")
    assert len(ledger.entries) == 1
    assert ledger.epsilon(1e-3) <= 10.0


class _Patches(torch.utils.data.Dataset):
    """Patient i's j-th draw is patch (i, j mod k): a stand-in for random crops."""

    def __init__(self, n: int, k: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, k, N_IN, generator=g) * 3
        self.y = torch.randint(0, N_OUT, (n, k), generator=g)
        self.k, self.calls = k, [0] * n

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        j = self.calls[i] % self.k
        self.calls[i] += 1
        return self.x[i, j], self.y[i, j]


def test_augmentation_multiplicity_clips_the_patient_not_the_patch():
    """K patches of a drawn patient: their gradients are averaged, then the
    patient's gradient is clipped (noise 0, q = 1, so the step is exact)."""
    n, k, clip = 6, 3, 0.05
    data = _Patches(n, k)
    torch.manual_seed(0)
    model = torch.nn.Linear(N_IN, N_OUT)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    local_train(
        model,
        data,
        torch.nn.CrossEntropyLoss(),
        epochs=1,
        batch_size=n,
        learning_rate=1.0,
        optimizer="sgd",
        device=torch.device("cpu"),
        seed=0,
        dp=DPSpec(0.0, clip, "hooks"),
        multiplicity=k,
    )
    # by hand: per patient, mean of its k patch gradients, clipped, averaged
    ref = torch.nn.Linear(N_IN, N_OUT)
    ref.load_state_dict(start)
    total = {name: torch.zeros_like(p) for name, p in ref.named_parameters()}
    for i in range(n):
        ref.zero_grad()
        torch.nn.CrossEntropyLoss()(ref(data.x[i]), data.y[i]).backward()
        grads = {name: p.grad.clone() for name, p in ref.named_parameters()}
        norm = torch.cat([g.flatten() for g in grads.values()]).norm()
        scale = min(1.0, clip / (norm.item() + 1e-6))
        for name in total:
            total[name] += grads[name] * scale
    for name, p in model.named_parameters():
        expected = start[name] - total[name] / n
        assert torch.allclose(p.detach(), expected, atol=1e-5), name
    assert all(c >= k for c in data.calls)  # k patches per patient and step
    # clipping each patch, then averaging, would give another step
    alt = torch.zeros_like(total["weight"])
    for i in range(n):
        for j in range(k):
            ref.zero_grad()
            loss = torch.nn.CrossEntropyLoss()(
                ref(data.x[i, j : j + 1]), data.y[i, j : j + 1]
            )
            loss.backward()
            norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm()
            alt += ref.weight.grad * min(1.0, clip / (norm.item() + 1e-6)) / k
    assert not torch.allclose(alt / n, total["weight"] / n, atol=1e-4)
