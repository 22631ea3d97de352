"""Every plan strategy, the norm rule of the update guard, robust aggregation,
and server optimiser state that survives a resume exactly."""

import typing

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord
from torch import nn
from torch.utils.data import TensorDataset

from client.train import local_train
from common.config import Plan, StrategyName
from server.checkpoint import load_checkpoint, load_server_state, save_checkpoint
from server.strategy.aggregators import build_strategy
from server.strategy.wrapper import SiteAwareStrategy
from tests.fakes import FiveNodeGrid, fake_arrays, train_reply, wrap_strategy

pytestmark = pytest.mark.usefixtures("task_identity")

ALL = list(typing.get_args(StrategyName))


def _rec(w: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.astype(np.float32)) for k, v in w.items()})


def test_every_plan_strategy_aggregates_one_round():
    assert len(ALL) == 11
    for name in ALL:
        s = wrap_strategy(name, min_sites=5)
        list(s.configure_train(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))
        replies = [train_reply(i, f"s{i}", float(i), i) for i in range(1, 6)]
        arrays, _ = s.aggregate_train(1, replies)
        assert arrays is not None, name
        w = arrays["w"].numpy()
        assert w.dtype == np.float32 and np.isfinite(w).all(), name
        assert s._current.aggregated, name
        if name in ("fedavg", "fedprox"):
            assert np.allclose(w, 55 / 15)  # sum(i * i) / sum(i)
        elif name in ("fedmedian", "bulyan"):
            assert np.allclose(w, 3.0)
        elif name == "krum":
            # one whole update, among the most central (2 and 3 tie)
            assert np.ptp(w) == 0 and float(w.flat[0]) in (2.0, 3.0)
        else:
            assert 0 < w.mean() <= 5.0, name


def test_fedprox_sends_mu_and_unknown_strategy_is_refused():
    s = wrap_strategy("fedprox", **{"proximal-mu": 0.25})
    msgs = list(s.configure_train(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))
    assert msgs[0].content["config"]["proximal-mu"] == 0.25
    with pytest.raises(ValueError, match="available"):
        build_strategy("fedsgd", 1, 1.0)


def test_robust_strategy_needs_enough_sites_in_the_plan():
    with pytest.raises(ValueError, match="min-sites >= 7"):
        Plan.model_validate(
            {"strategy": "bulyan", "num-malicious-sites": 1, "min-sites": 5}
        )
    Plan.model_validate(
        {"strategy": "bulyan", "num-malicious-sites": 1, "min-sites": 7}
    )


def test_nan_shape_and_scaled_updates_rejected_round_completes():
    s = wrap_strategy(min_sites=2, norm_factor=10.0)
    list(s.configure_train(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))
    replies = [
        train_reply(1, "a", 1.0, 1),
        train_reply(2, "b", 1.2, 1),
        train_reply(3, "c", 0.8, 1),
        train_reply(4, "nan", float("nan"), 1),
        train_reply(5, "shape", fake_arrays(1.0, shape=(3, 2)), 1),
        train_reply(6, "scaled", 100.0, 1),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    rej = s._current.rejected
    assert "NaN or Inf" in rej["nan"]
    assert "shape" in rej["shape"]
    assert "update norm" in rej["scaled"] and "median" in rej["scaled"]
    assert set(rej) == {"nan", "shape", "scaled"}
    assert set(s._current.train) == {"a", "b", "c"}
    assert s._current.aggregated
    assert np.allclose(arrays["w"].numpy(), 1.0)  # (1 + 1.2 + 0.8) / 3


def test_norm_rule_catches_one_of_two_and_can_skip_the_round():
    s = wrap_strategy(min_sites=2, norm_factor=10.0)
    list(s.configure_train(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))
    arrays, metrics = s.aggregate_train(
        1, [train_reply(1, "a", 1.0, 1), train_reply(2, "big", 100.0, 1)]
    )
    assert "update norm" in s._current.rejected["big"]
    assert "a" not in s._current.rejected
    # one valid update left, two needed: the global model stays as it was
    assert arrays is None and metrics is None and not s._current.aggregated
    # the rule is off with factor 0
    s = wrap_strategy(min_sites=2, norm_factor=0.0)
    list(s.configure_train(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))
    arrays, _ = s.aggregate_train(
        1, [train_reply(1, "a", 1.0, 1), train_reply(2, "big", 100.0, 1)]
    )
    assert arrays is not None and not s._current.rejected


def test_krum_ignores_one_scaled_update_among_five():
    s = wrap_strategy("krum", min_sites=5, **{"num-malicious-sites": 1})
    list(s.configure_train(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))
    good = [1.0, 1.1, 0.9, 1.05]
    replies = [train_reply(i, f"s{i}", v, 1) for i, v in enumerate(good)]
    replies.append(train_reply(9, "evil", 100.0, 1))
    arrays, _ = s.aggregate_train(1, replies)
    assert not s._current.rejected  # the guard is off: Krum alone handles it
    w = float(arrays["w"].numpy().max())
    assert any(abs(w - g) < 1e-6 for g in good)
    # FedAvg would have been dragged far away
    s = wrap_strategy("fedavg", min_sites=5)
    list(s.configure_train(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays["w"].numpy().max() > 10


def _fake_update(global_w: ArrayRecord, rnd: int, site: int) -> ArrayRecord:
    # deterministic "training": a step that depends on the round and site
    rng = np.random.default_rng(100 * rnd + site)
    return _rec(
        {
            k: global_w[k].numpy() + rng.normal(0, 0.1, global_w[k].shape)
            for k in global_w.keys()
        }
    )


def _run(s: SiteAwareStrategy, arrays: ArrayRecord, rounds: range) -> ArrayRecord:
    for r in rounds:
        local = r - s.round_offset
        list(s.configure_train(local, arrays, ConfigRecord(), FiveNodeGrid()))
        replies = [
            train_reply(i, f"s{i}", _fake_update(arrays, r, i), i) for i in (1, 2, 3)
        ]
        arrays, _ = s.aggregate_train(local, replies)
        assert arrays["w"].numpy().dtype == np.float32  # kept across rounds
        list(s.configure_evaluate(local, arrays, ConfigRecord(), FiveNodeGrid()))
    return arrays


@pytest.mark.parametrize(
    "name, keys",
    [
        ("fedadam", {}),
        ("fedyogi", {}),
        ("fedadagrad", {}),
        ("fedavgm", {"server-momentum": 0.9, "server-learning-rate": 0.5}),
    ],
)
def test_server_state_resumes_exactly(tmp_path, name, keys):
    start = fake_arrays(0.0)
    straight = _run(wrap_strategy(name, **keys), start, range(1, 5))

    first = wrap_strategy(name, **keys)
    mid = _run(first, start, range(1, 3))
    state = first.export_state()
    assert state  # moments / momentum exist after two rounds
    save_checkpoint(tmp_path, 2, mid.to_torch_state_dict(), {}, server_state=state)
    weights, meta = load_checkpoint(tmp_path)
    resumed = wrap_strategy(name, offset=2, **keys)
    resumed.import_state(load_server_state(tmp_path, meta))
    end = _run(resumed, ArrayRecord(weights), range(3, 5))
    for k in straight.keys():
        assert np.array_equal(straight[k].numpy(), end[k].numpy()), (name, k)

    # without the state the continuation differs: the test can fail
    cold = _run(
        wrap_strategy(name, offset=2, **keys), ArrayRecord(weights), range(3, 5)
    )
    assert not np.array_equal(straight["w"].numpy(), cold["w"].numpy())


def test_damaged_server_state_is_refused(tmp_path):
    save_checkpoint(
        tmp_path,
        1,
        {"w": torch.zeros(2)},
        {},
        server_state={"m_t/w": np.ones(2, np.float32)},
    )
    _, meta = load_checkpoint(tmp_path)
    path = tmp_path / meta["server_state"]
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(Exception, match="checksum"):
        load_server_state(tmp_path, meta)


def test_state_of_another_strategy_is_refused():
    with pytest.raises(ValueError, match="original strategy"):
        wrap_strategy("fedavgm").import_state({"m_t/w": np.ones(2)})


def test_one_round_fedavg_equals_one_centralised_step():
    torch.manual_seed(0)
    sizes = [3, 5, 8]
    xs = [torch.randn(n, 4) for n in sizes]
    ys = [torch.randn(n, 2) for n in sizes]
    init = nn.Linear(4, 2)
    lr = 0.1

    replies = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        model = nn.Linear(4, 2)
        model.load_state_dict(init.state_dict())
        local_train(
            model,
            TensorDataset(x, y),
            nn.MSELoss(),
            epochs=1,
            batch_size=len(x),  # full batch: one step
            learning_rate=lr,
            optimizer="sgd",
            device=torch.device("cpu"),
            seed=i,
        )
        replies.append(
            train_reply(i + 1, f"s{i}", ArrayRecord(model.state_dict()), len(x))
        )
    s = wrap_strategy()
    list(
        s.configure_train(
            1, ArrayRecord(init.state_dict()), ConfigRecord(), FiveNodeGrid()
        )
    )
    fed, _ = s.aggregate_train(1, replies)

    central = nn.Linear(4, 2)
    central.load_state_dict(init.state_dict())
    nn.MSELoss()(central(torch.cat(xs)), torch.cat(ys)).backward()
    with torch.no_grad():
        for p in central.parameters():
            p -= lr * p.grad
    for k, v in central.state_dict().items():
        assert np.allclose(fed[k].numpy(), v.numpy(), atol=1e-6), k
