"""Discrete-time survival (common/survival.py): the loss is a per-patient
likelihood, curves and scores agree, metrics match brute force and sksurv."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.survival import (
    RISK_GROUPS,
    LogisticHazardLoss,
    interval_index,
    km_counts,
    km_from_counts,
    parse_days,
    risk_score,
    survival_at,
    survival_curve,
)
from common.survival_metrics import survival_metrics

EDGES = (365.0, 730.0, 1095.0, 1460.0, 1825.0)
HORIZONS = (365.0, 730.0, 1095.0)


def _target(time: list[float], event: list[int]) -> torch.Tensor:
    return torch.tensor([time, event], dtype=torch.float64).T


@st.composite
def _batches(draw: st.DrawFn) -> tuple[tuple[float, ...], torch.Tensor, torch.Tensor]:
    k = draw(st.integers(1, 4))
    gaps = draw(st.lists(st.floats(1.0, 400.0), min_size=k, max_size=k))
    edges = tuple(np.cumsum(gaps).tolist())
    b = draw(st.integers(2, 6))
    times = draw(st.lists(st.floats(0.0, edges[-1] * 1.3), min_size=b, max_size=b))
    events = draw(st.lists(st.integers(0, 1), min_size=b, max_size=b))
    logits = draw(st.lists(st.floats(-6.0, 6.0), min_size=b * k, max_size=b * k))
    return (
        edges,
        torch.tensor(logits, dtype=torch.float64).reshape(b, k),
        _target(times, events),
    )


def _grad(loss_fn: LogisticHazardLoss, logits: torch.Tensor, target: torch.Tensor):
    x = logits.clone().requires_grad_(True)
    loss_fn(x, target).backward()
    return x.grad


@settings(max_examples=25, deadline=None)
@given(_batches(), st.data())
def test_loss_is_a_mean_of_per_patient_terms(batch, data) -> None:
    edges, logits, target = batch
    loss_fn = LogisticHazardLoss(edges)
    b = logits.shape[0]
    grad = _grad(loss_fn, logits, target)
    for i in range(b):
        own = _grad(loss_fn, logits[i : i + 1], target[i : i + 1])
        torch.testing.assert_close(grad[i], own[0] / b)
    # another patient's outcome does not move this patient's gradient
    i = data.draw(st.integers(0, b - 1))
    j = (i + 1) % b
    changed = target.clone()
    changed[j, 0] = data.draw(st.floats(0.0, edges[-1] * 1.3))
    changed[j, 1] = 1.0 - changed[j, 1]
    torch.testing.assert_close(_grad(loss_fn, logits, changed)[i], grad[i])


def test_loss_by_hand() -> None:
    # edges 100, 200, 300: midpoints 50, 150, 250
    loss_fn = LogisticHazardLoss((100.0, 200.0, 300.0))
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3, 1.0], [-ln3, 0.0, ln3]], dtype=torch.float64)
    # patient A: event at 150 (interval 1), hazards 0.5, 0.75
    a = -math.log(1 - 0.5) - math.log(0.75)
    # patient B: censored at 260 (interval 2, past its midpoint), hazards
    # 0.25, 0.5, 0.75, all survived
    b = -math.log(1 - 0.25) - math.log(1 - 0.5) - math.log(1 - 0.75)
    loss = loss_fn(logits, _target([150.0, 260.0], [1, 0]))
    assert loss.item() == pytest.approx((a + b) / 2, rel=1e-12)
    # censored at 210, before interval 2's midpoint: interval 2 not counted
    early = loss_fn(logits[1:], _target([210.0], [0]))
    assert early.item() == pytest.approx(-math.log(0.75) - math.log(0.5), rel=1e-12)


def test_censored_patient_has_no_event_term_and_late_times_survive_all() -> None:
    loss_fn = LogisticHazardLoss(EDGES)
    logits = torch.randn(1, len(EDGES), dtype=torch.float64) * 2
    softplus = torch.nn.functional.softplus(logits)[0]
    # interval 2 is [730, 1095), midpoint 912.5: censored before it or after
    censored = loss_fn(logits, _target([900.0], [0]))
    torch.testing.assert_close(censored, softplus[:2].sum())
    late = loss_fn(logits, _target([1000.0], [0]))
    torch.testing.assert_close(late, softplus[:3].sum())
    # at or beyond the last edge an event is censored there: all K survived
    for time in (1825.0, 4000.0):
        beyond = loss_fn(logits, _target([time], [1]))
        torch.testing.assert_close(beyond, softplus.sum())


def test_empty_batch_keeps_the_graph() -> None:
    logits = torch.zeros(0, len(EDGES), requires_grad=True)
    loss = LogisticHazardLoss(EDGES)(logits, torch.zeros(0, 2))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None


def test_interval_index_numpy_and_torch_agree() -> None:
    time = [0.0, 364.9, 365.0, 1824.0, 1825.0, 9000.0]
    expected = [0, 0, 1, 4, 4, 4]
    got_np = interval_index(np.array(time), EDGES)
    got_t = interval_index(torch.tensor(time, dtype=torch.float32), EDGES)
    assert got_np.dtype == np.int64 and got_np.tolist() == expected
    assert got_t.dtype == torch.int64 and got_t.tolist() == expected


def test_curve_and_risk_score() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, len(EDGES), generator=gen, dtype=torch.float64) * 3
    curve = survival_curve(logits)
    assert ((curve >= 0) & (curve <= 1)).all()
    assert (curve[:, 1:] <= curve[:, :-1]).all()
    hazards = torch.sigmoid(logits)
    torch.testing.assert_close(curve, torch.cumprod(1 - hazards, dim=1))
    risk = risk_score(logits)
    assert torch.equal(torch.argsort(risk), torch.argsort(1 - curve[:, -1]))
    assert survival_at(curve.numpy(), EDGES, 100.0).tolist() == [1.0] * 64
    np.testing.assert_array_equal(
        survival_at(curve.numpy(), EDGES, 800.0), curve[:, 1].numpy()
    )


def _cohort(rng: np.random.Generator, n: int, censor: bool = True):
    """Patients with a known exponential hazard rising with a covariate, the
    model's curve derived from that hazard, and censoring if asked."""
    x = rng.normal(size=n)
    rate = np.exp(0.8 * x) / 700.0
    time = rng.exponential(1.0 / rate)
    event = np.ones(n, int)
    if censor:
        cens = rng.uniform(100.0, 2500.0, size=n)
        event = (time <= cens).astype(int)
        time = np.minimum(time, cens)
    curve = np.exp(-rate[:, None] * np.asarray(EDGES)[None, :])
    return np.round(time, 3) + 0.5, event, curve, rate


def _brute_harrell(time, event, risk) -> float:
    num = den = 0.0
    for i in range(len(time)):
        if not event[i]:
            continue
        for j in range(len(time)):
            if time[i] < time[j]:
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0
    return num / den


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_harrell_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    tt, te, _, _ = _cohort(rng, 300)
    time, event, curve, rate = _cohort(rng, 80)
    risk = np.round(rate * 700, 1)  # rounded so that some risks tie
    got = survival_metrics(tt, te, time, event, curve, risk, EDGES, HORIZONS)
    assert got["c-harrell"] == pytest.approx(_brute_harrell(time, event, risk))
    assert got["cases-outcome"] == 80.0 and got["cases-event"] == event.sum()


def test_perfect_risk_and_uno_close_to_harrell_without_censoring() -> None:
    rng = np.random.default_rng(3)
    tt, te, _, _ = _cohort(rng, 1000, censor=False)
    time, event, curve, rate = _cohort(rng, 300, censor=False)
    perfect = survival_metrics(tt, te, time, event, curve, -time, EDGES, HORIZONS)
    assert perfect["c-harrell"] == 1.0
    got = survival_metrics(tt, te, time, event, curve, rate, EDGES, HORIZONS)
    assert abs(got["c-uno"] - got["c-harrell"]) < 0.02
    assert got["c-harrell"] > 0.6


def test_td_auc_random_near_half_true_hazard_above() -> None:
    rng = np.random.default_rng(4)
    tt, te, _, _ = _cohort(rng, 600)
    time, event, curve, rate = _cohort(rng, 400)
    noise = np.sort(rng.uniform(size=(400, len(EDGES))), axis=1)[:, ::-1]
    random = survival_metrics(
        tt, te, time, event, noise, rng.uniform(size=400), EDGES, HORIZONS
    )
    good = survival_metrics(tt, te, time, event, curve, rate, EDGES, HORIZONS)
    for h in (365, 730, 1095):
        assert abs(random[f"td-auc-{h}"] - 0.5) < 0.1
        assert good[f"td-auc-{h}"] > 0.6
    assert 0.0 < good["ibs"] < random["ibs"]
    # calibration at the last horizon: the true curve is close to Kaplan-Meier
    assert abs(good["cal-pred-1095"] - good["cal-obs-1095"]) < 0.08
    for value in (*random.values(), *good.values()):
        assert isinstance(value, float) and math.isfinite(value)


def test_undefined_metrics_are_left_out() -> None:
    rng = np.random.default_rng(5)
    tt, te, _, _ = _cohort(rng, 200)
    time, event, curve, rate = _cohort(rng, 50)
    none = survival_metrics(tt, te, time, 0 * event, curve, rate, EDGES, HORIZONS)
    assert set(none) == {"cases-outcome", "cases-event"}
    assert none["cases-event"] == 0.0
    one = survival_metrics(tt, te, time[:1], event[:1], curve[:1], rate[:1], EDGES, ())
    assert set(one) == {"cases-outcome", "cases-event"}
    # validation follow-up beyond the largest training time: censored there for
    # the weighted metrics, which stay defined
    # (sksurv refuses them where censoring has not reached zero there)
    short_event = te.copy()
    short_event[np.argmax(tt)] = 1
    late_event = event.copy()
    late_event[np.argmax(time)] = 1
    assert time.max() > tt.max() / 2
    half = survival_metrics(
        tt / 2, short_event, time, late_event, curve, rate, EDGES, HORIZONS
    )
    assert {"c-uno", "td-auc-365", "ibs"} <= set(half)
    # validation follow-up far beyond every training time: no crash, all finite
    late = survival_metrics(
        tt / 10, te, time + 500, event, curve, rate, EDGES, (180.0, 5000.0)
    )
    assert "c-harrell" in late and "td-auc-5000" not in late
    assert all(math.isfinite(v) for v in late.values())
    # no training outcomes: only the metrics that do not need them
    bare = survival_metrics(
        np.zeros(0), np.zeros(0), time, event, curve, rate, EDGES, HORIZONS
    )
    assert "c-harrell" in bare and "c-uno" not in bare and "ibs" not in bare


def test_km_counts_totals() -> None:
    rng = np.random.default_rng(6)
    time, event, _, rate = _cohort(rng, 101)
    inside = time < EDGES[-1]
    counts = km_counts(time, event, rate, EDGES)
    assert all(isinstance(v, int) for v in counts.values())
    assert sum(counts[f"cases-atrisk-{g}-0"] for g in RISK_GROUPS) == 101
    assert counts["cases-atrisk-low-0"] == 51  # the median patient is low
    total = sum(counts[f"km-events-{g}-{k}"] for g in RISK_GROUPS for k in range(5))
    assert total == int(event[inside].sum())
    single = km_counts(time[:1], event[:1], rate[:1], EDGES)
    assert single["cases-atrisk-low-0"] == 1 and single["cases-atrisk-high-0"] == 0


def test_km_from_counts_matches_sksurv_on_interval_starts() -> None:
    from sksurv.nonparametric import kaplan_meier_estimator

    rng = np.random.default_rng(7)
    starts = np.array((0.0, *EDGES[:-1]))
    time = starts[rng.integers(0, len(starts), size=120)]
    time[time == 0.0] = 1e-9  # at the start of interval 0, within the interval
    event = rng.integers(0, 2, size=120)
    counts = km_counts(time, event, np.zeros(120), EDGES)  # all in "low"
    atrisk = [counts[f"cases-atrisk-low-{k}"] for k in range(5)]
    events = [counts[f"km-events-low-{k}"] for k in range(5)]
    ours = km_from_counts(atrisk, events)
    km_t, km_s = kaplan_meier_estimator(event.astype(bool), time)
    # survival at the end of interval k is Kaplan-Meier just before e_k,
    # which with every time on an interval start is its value at start_k
    expected = [km_s[np.searchsorted(km_t, s, side="right") - 1] for s in starts]
    expected[0] = km_s[0]
    np.testing.assert_allclose(ours, expected, rtol=1e-12)


def test_km_from_counts_stops_at_an_empty_interval() -> None:
    assert km_from_counts([10, 5, 0, 3], [2, 1, 0, 1]) == pytest.approx([0.8, 0.64])
    assert km_from_counts([10, None], [5, 1]) == [0.5]
    assert km_from_counts([10, 5], [5]) == [0.5]
    assert km_from_counts([], []) == []
    with pytest.raises(ValueError, match="inconsistent"):
        km_from_counts([3], [4])


def test_parse_days() -> None:
    assert parse_days("180, 365,730") == (180.0, 365.0, 730.0)
    for bad, fix in [
        ("", "comma-separated"),
        ("180,abc", "not a number"),
        ("0,365", "positive"),
        ("365,-1", "positive"),
        ("365,180", "increasing"),
        ("365,365", "increasing"),
        ("180,inf", "finite"),
        ("nan", "finite"),
    ]:
        with pytest.raises(ValueError, match=fix):
            parse_days(bad)
