"""One site's bound on the global model: the weight cap (``max-site-weight``),
untrusted ``num-examples``, replies without train-loss, and the update guard's
allowance for each site's expected DP noise."""

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from hypothesis import given, settings
from hypothesis import strategies as st

from common import wire
from common.config import Plan
from server.reporting.metrics_log import round_entry
from server.strategy.aggregators import build_strategy
from server.strategy.influence import LocalTraining, capped_shares
from server.strategy.wrapper import SiteAwareStrategy
from tests.fakes import FiveNodeGrid, fake_arrays, fake_reply, forbid_flower_mean

pytestmark = pytest.mark.usefixtures("task_identity")

# -- the cap itself: hand-computed water-filling ----------------------------------


@pytest.mark.parametrize(
    "weights, cap, want",
    [
        ([1e9, 100, 100], 0.5, [0.5, 0.25, 0.25]),
        ([6, 3, 1], 0.5, [0.5, 0.375, 0.125]),  # the excess 0.1 goes 3:1
        # 100 capped first; then 30 gets 0.65 * 30/50 = 0.39 > 0.35, capped too
        ([100, 30, 10, 10], 0.35, [0.35, 0.35, 0.15, 0.15]),
        ([5, 1, 1, 1, 1], 0.2, [0.2] * 5),  # cap = 1/K: equal weights
        ([5, 1, 1, 1, 1], 0.1, [0.2] * 5),  # cap < 1/K: equal weights
    ],
)
def test_capped_shares_hand_computed(weights, cap, want):
    got = capped_shares(weights, cap)
    assert got == pytest.approx(want, rel=1e-12)
    assert sum(got) == pytest.approx(1.0, rel=1e-12)


def test_capped_shares_are_flowers_factors_where_the_cap_does_not_bind():
    weights = [2.0, 3.0, 4.0]  # largest share 4/9 < 0.5
    assert capped_shares(weights, 0.5) == [w / 9.0 for w in weights]  # exact


WEIGHTS = st.one_of(
    st.floats(min_value=0.0, max_value=1e308),  # overflow, subnormals, zeros
    st.integers(min_value=1, max_value=10_000_000).map(float),  # case counts
    st.sampled_from([1e308, 1.7e308, 5e-324, 160.0, 1.0]),
)


@settings(max_examples=1000, derandomize=True, database=None, deadline=None)
@given(
    weights=st.lists(WEIGHTS, min_size=1, max_size=40).filter(lambda w: max(w) > 0),
    cap=st.one_of(st.floats(min_value=1e-6, max_value=1.0), st.just(1.0)),
)
def test_capped_shares_hold_for_any_weights(weights, cap):
    shares = capped_shares(weights, cap)
    k = sum(w > 0 for w in weights)
    assert len(shares) == len(weights)
    assert all(math.isfinite(x) and x >= 0 for x in shares)
    assert abs(math.fsum(shares) - 1.0) <= 1e-9
    assert max(shares) <= max(cap, 1.0 / k) + 1e-12
    assert all(x == 0 for x, w in zip(shares, weights, strict=True) if w == 0)
    total = sum(weights)
    if math.isfinite(total) and max(w / total for w in weights) <= cap:
        # Flower's FedAvg factors (aggregate_arrayrecords), bit for bit
        assert shares == [w / total for w in weights]


@pytest.mark.parametrize(
    "weights, cap", [([], 0.5), ([1.0, -1.0], 0.5), ([0.0], 0.5), ([1.0], 0.0)]
)
def test_capped_shares_refuse_what_is_not_a_weight(weights, cap):
    if not weights:
        assert capped_shares(weights, cap) == []
        return
    with pytest.raises(ValueError):
        capped_shares(weights, cap)
    with pytest.raises(ValueError):
        capped_shares([1.0, math.nan], 0.5)


# -- the cap in the aggregate ------------------------------------------------------


def _train(node, site, arrays, metrics):
    return fake_reply(
        node,
        RecordDict(
            {
                wire.ARRAYS: arrays,
                wire.METRICS: MetricRecord({wire.REFUSED: 0, **metrics}),
                wire.SITE: ConfigRecord({wire.SITE_NAME: site}),
            }
        ),
    )


def _site(node, site, w, n, **extra):
    metrics = {wire.NUM_EXAMPLES: n, wire.TRAIN_LOSS: 1.0, **extra}
    return _train(node, site, fake_arrays(w) if isinstance(w, float) else w, metrics)


def _wrap(name="fedavg", cap=0.5, reference=None, **kw):
    options = {}
    if name == "fedavgm":
        options = {"server_learning_rate": 1.0, "server_momentum": 0.9}
    s = SiteAwareStrategy(
        build_strategy(name, 1, 1.0, **options),
        min_sites=1,
        round_offset=0,
        base_config={},
        on_round_end=lambda rec, arrays: None,
        max_site_weight=cap,
        **kw,
    )
    ref = reference if reference is not None else fake_arrays(0.0)
    list(s.configure_train(1, ref, ConfigRecord(), FiveNodeGrid()))
    return s


LIAR_CLAIM = 100_000  # max-site-examples: the most a reply may claim


def _liar_round(claim=LIAR_CLAIM):
    # "huge" claims 100,000 cases against two sites of 100
    return [
        _site(1, "huge", 1.0, claim),
        _site(2, "b", 2.0, 100),
        _site(3, "c", 3.0, 100),
    ]


def test_huge_num_examples_is_capped_in_the_fast_fedavg_mean(monkeypatch):
    s = _wrap("fedavg", cap=0.5)
    forbid_flower_mean(monkeypatch, s)
    arrays, _ = s.aggregate_train(1, _liar_round())
    # shares 0.5, 0.25, 0.25: 0.5 * 1 + 0.25 * 2 + 0.25 * 3
    assert np.allclose(arrays["w"].numpy(), 1.75)
    assert np.allclose(arrays["b"].numpy(), 1.75)
    rec = s._current
    assert rec.weights == pytest.approx({"huge": 0.5, "b": 0.25, "c": 0.25})
    assert rec.capped == ["huge"]
    entry = round_entry(rec)  # what metrics.jsonl gets
    assert entry["capped"] == ["huge"] and entry["weights"]["huge"] == 0.5
    assert rec.train["huge"][wire.NUM_EXAMPLES] == LIAR_CLAIM  # for reports
    # without the cap the liar takes the model over: the test can fail
    s = _wrap("fedavg", cap=1.0)
    arrays, _ = s.aggregate_train(1, _liar_round())
    assert np.allclose(arrays["w"].numpy(), 1.0, atol=0.01)
    assert s._current.capped == []


@pytest.mark.parametrize("claim", [LIAR_CLAIM + 1, 1e9, 1e308, 2.5])
def test_a_claim_over_max_site_examples_or_not_whole_is_rejected(claim):
    s = _wrap("fedavg", cap=0.5)
    arrays, _ = s.aggregate_train(1, _liar_round(claim))
    assert "max-site-examples" in s._current.rejected["huge"]
    assert np.allclose(arrays["w"].numpy(), 2.5)  # b and c, 100 cases each
    assert set(s._current.weights) == {"b", "c"}


def test_huge_num_examples_is_capped_in_flowers_fedavgm(monkeypatch):
    s = _wrap("fedavgm", cap=0.5)
    arrays, _ = s.aggregate_train(1, _liar_round())
    # round 1 of FedAvgM at server learning rate 1 lands on the weighted mean
    assert np.allclose(arrays["w"].numpy(), 1.75)
    assert s._current.capped == ["huge"]


def test_huge_num_examples_is_capped_in_flowers_fedadam():
    s = _wrap("fedadam", cap=0.5)
    got, _ = s.aggregate_train(1, _liar_round())
    # Flower's own FedAdam on the same updates weighted 2:1:1 (0.5, 0.25, 0.25)
    plain = build_strategy("fedadam", 1, 1.0)
    list(plain.configure_train(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))
    fair = [_site(1, "huge", 1.0, 2), _site(2, "b", 2.0, 1), _site(3, "c", 3.0, 1)]
    want, _ = plain.aggregate_train(1, fair)
    for key in want.keys():
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-6)


def test_central_dp_fedavg_sees_the_capped_shares():
    s = SiteAwareStrategy(
        build_strategy("fedavg", 1, 1.0, "server-fixed", 0.0, 1e6, num_sites=3),
        min_sites=1,
        round_offset=0,
        base_config={},
        on_round_end=lambda rec, arrays: None,
        max_site_weight=0.5,
    )
    list(s.configure_train(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))
    arrays, _ = s.aggregate_train(1, _liar_round())  # no noise, no clipping
    assert np.allclose(arrays["w"].numpy(), 1.75)


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_cap_not_binding_changes_nothing(name, monkeypatch):
    def replies():
        return [_site(1, "a", 1.0, 2), _site(2, "b", 2.0, 3), _site(3, "c", 3.0, 4)]

    seen = []
    capped = _wrap(name, cap=0.5)
    inner = capped.inner.aggregate_train
    monkeypatch.setattr(
        capped.inner, "aggregate_train", lambda r, m: seen.extend(m) or inner(r, m)
    )
    sent = replies()
    got, got_metrics = capped.aggregate_train(1, sent)
    want, want_metrics = _wrap(name, cap=1.0).aggregate_train(1, replies())
    for key in want.keys():
        assert got[key].data == want[key].data, key  # the very same bytes
    assert dict(got_metrics) == dict(want_metrics)
    assert capped._current.capped == []
    if name == "fedadam":  # Flower got the replies themselves
        assert all(a is b for a, b in zip(seen, sent, strict=True))


def test_unweighted_strategy_records_no_shares():
    s = _wrap("fedmedian", cap=0.5)
    arrays, _ = s.aggregate_train(1, _liar_round())
    assert np.allclose(arrays["w"].numpy(), 2.0)
    assert s._current.weights == {} and s._current.capped == []


@pytest.mark.parametrize("claim", [-199.0, 0.0, math.inf, math.nan, None])
def test_num_examples_that_is_not_a_case_count_is_rejected(claim):
    # weights 100, 100, -199 would multiply the honest mean by -199 / 1
    metrics = {wire.TRAIN_LOSS: 1.0}
    if claim is not None:
        metrics[wire.NUM_EXAMPLES] = claim
    liar = _train(3, "liar", fake_arrays(-50.0), metrics)
    s = _wrap("fedavg", cap=1.0)
    arrays, _ = s.aggregate_train(
        1, [_site(1, "a", 1.0, 100), _site(2, "b", 3.0, 100), liar]
    )
    assert "num-examples" in s._current.rejected["liar"]
    assert np.allclose(arrays["w"].numpy(), 2.0)


# -- replies without train-loss (sites under DP send none) ------------------------


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_a_reply_without_train_loss_still_aggregates(name):
    def replies():
        dp = _train(
            2, "dp", fake_arrays(3.0), {wire.NUM_EXAMPLES: 1, wire.DP_ENABLED: 1}
        )
        return [_site(1, "plain", 1.0, 1), dp]

    # Flower alone refuses replies whose metric records differ in keys
    with pytest.raises(InconsistentMessageReplies):
        FedAvg(weighted_by_key=wire.NUM_EXAMPLES).aggregate_train(1, replies())
    s = _wrap(name, cap=1.0)
    arrays, metrics = s.aggregate_train(1, replies())
    assert arrays is not None and s._current.aggregated
    if name == "fedavg":
        assert np.allclose(arrays["w"].numpy(), 2.0)
        assert wire.TRAIN_LOSS not in metrics  # not a mean over half the sites
    assert wire.TRAIN_LOSS not in s._current.train["dp"]
    assert s._current.train["plain"][wire.TRAIN_LOSS] == 1.0


# -- the guard's allowance for expected DP noise -----------------------------------

P = 4096  # parameters: a noise vector's norm is within ~2% of std x sqrt(P)


def _noise_step(std: float, steps: int, optimizer: str, lr: float) -> float:
    """Std per parameter of an update made of ``steps`` pure-noise gradients."""
    p = torch.nn.Parameter(torch.zeros(20_000, dtype=torch.float64))
    if optimizer == "sgd":
        opt = torch.optim.SGD([p], lr=lr, momentum=0.9)  # client/train.py
    else:
        opt = torch.optim.Adam([p], lr=lr)
    gen = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * std
        opt.step()
    return float(p.detach().std())


@pytest.mark.parametrize(
    "optimizer, n, sigma, tol",
    [("sgd", 8, 1.0, 0.03), ("sgd", 500, 1.5, 0.03), ("adam", 8, 1.0, 0.03)]
    + [("adam", 500, 1.0, 0.25), ("adam", 5000, 2.0, 0.25)],
)
def test_noise_scale_matches_the_optimiser_on_pure_noise(optimizer, n, sigma, tol):
    plan = {
        "batch-size": 48,
        "learning-rate": 0.01,
        "dp-max-grad-norm": 2.0,
        "local-epochs": 1,
    }
    train = LocalTraining.from_plan(
        Plan.model_validate({**plan, "optimizer": optimizer})
    )
    steps = math.ceil(n / 48)
    per_step = sigma * 2.0 / (n / steps)  # Opacus: sigma C / expected batch
    want = _noise_step(per_step, steps, optimizer, 0.01)
    metrics = {wire.DP_ENABLED: 1, wire.NOISE_MULTIPLIER: sigma, wire.NUM_EXAMPLES: n}
    assert train.noise_scale(metrics) == pytest.approx(want, rel=tol)
    assert train.noise_scale({**metrics, wire.DP_ENABLED: 0}) == 0.0


def _noisy(std: float, seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {
            "w": Array((rng.standard_normal(P) * std).astype(np.float32)),
            "b": Array(np.zeros(1, np.float32)),
        }
    )


def _zero() -> ArrayRecord:
    return ArrayRecord(
        {"w": Array(np.zeros(P, np.float32)), "b": Array(np.zeros(1, np.float32))}
    )


def _dp_round(sites, factor, optimizer, training=True):
    """``sites``: (name, cases, noise multiplier, update std); the guard's
    rejections with the plan's noise model, or without it."""
    train = LocalTraining(48, 1, 0.01, optimizer, 1.0) if training else None
    s = _wrap("fedavg", cap=1.0, reference=_zero(), norm_factor=factor, training=train)
    replies = [
        _train(
            i + 1,
            name,
            _noisy(std, i),
            {wire.NUM_EXAMPLES: n, wire.DP_ENABLED: 1, wire.NOISE_MULTIPLIER: sigma},
        )
        for i, (name, n, sigma, std) in enumerate(sites)
    ]
    arrays, _ = s.aggregate_train(1, replies)
    return s._current.rejected, arrays


# Update std per parameter, by hand (lr 0.01, C 1, batch 48, one epoch):
# adam: lr sqrt(T); sgd: lr sigma / B x sqrt(sum_k ((1 - 0.9^k) / 0.1)^2).
_SGD_MOMENTUM_3 = math.sqrt(1 + 1.9**2 + 2.71**2)  # T = 3
_SGD_MOMENTUM_11 = math.sqrt(
    sum(((1 - 0.9**k) / 0.1) ** 2 for k in range(1, 12))
)  # T = 11
HONEST = {
    # Adam, 8000 cases: 167 steps, sqrt(167) = 12.9 x the small sites' noise
    "adam-large": (
        [
            ("small-a", 8, 1.0, 0.01),
            ("small-b", 8, 1.0, 0.01),
            ("large", 8000, 1.0, 0.01 * math.sqrt(167)),
        ],
        10.0,
        "adam",
        "large",
    ),
    # SGD, a small site (one step of 8 cases) that needs a larger noise
    # multiplier: 12 x 1 / 8 = 1.5 against 3 steps of 33.3 cases at sigma 1
    "sgd-small": (
        [
            ("small", 8, 12.0, 0.01 * 12 / 8),
            ("mid-a", 100, 1.0, 0.01 / (100 / 3) * _SGD_MOMENTUM_3),
            ("mid-b", 100, 1.0, 0.01 / (100 / 3) * _SGD_MOMENTUM_3),
        ],
        10.0,
        "sgd",
        "small",
    ),
    # the brief's two sites, 8 and 500 cases at sigma 1, under a strict factor
    "sgd-two-sites": (
        [
            ("small", 8, 1.0, 0.01 / 8),
            ("large", 500, 1.0, 0.01 / (500 / 11) * _SGD_MOMENTUM_11),
        ],
        2.0,
        "sgd",
        "large",
    ),
}


@pytest.mark.parametrize("case", sorted(HONEST))
def test_honest_dp_sites_whose_norms_differ_by_their_noise_are_accepted(case):
    sites, factor, optimizer, at_risk = HONEST[case]
    rejected, arrays = _dp_round(sites, factor, optimizer)
    assert rejected == {} and arrays is not None
    # the same round without the noise model loses an honest site
    rejected, _ = _dp_round(sites, factor, optimizer, training=False)
    assert set(rejected) == {at_risk}


@pytest.mark.parametrize(
    "liar_sigma, scale, allowed",
    [(1.0, 100.0, "update norm"), (1e6, 200.0, "allowing 10x")],
)
def test_an_update_its_noise_does_not_explain_is_rejected(liar_sigma, scale, allowed):
    honest = 0.01 / (100 / 3) * _SGD_MOMENTUM_3
    sites = [(f"s{i}", 100, 1.0, honest) for i in range(3)]
    sites.append(("liar", 100, liar_sigma, honest * scale))
    rejected, arrays = _dp_round(sites, 10.0, "sgd")
    assert set(rejected) == {"liar"} and allowed in rejected["liar"]
    assert float(np.abs(arrays["w"].numpy()).max()) < 50 * honest
