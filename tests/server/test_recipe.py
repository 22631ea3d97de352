"""The recipe across rounds at the coordinator: the moving average of the
global model (``ema-decay``) and the learning rate of each round
(``lr-schedule``), through Flower's own round loop over a fake grid, and
across a resume."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common import wire
from common.config import ConfigError, Plan, load_plan
from server.app import run_rounds
from server.checkpoint import CheckpointError, load_checkpoint, load_ema
from server.lr_schedule import learning_rates, round_learning_rate
from server.reporting.status import RunStatus
from server.round_end import RunMeta
from server.run_start import start_point
from server.strategy.aggregators import build_strategy
from server.strategy.ema import ParameterEMA
from server.strategy.wrapper import SiteAwareStrategy
from tests.fakes import fake_reply

pytestmark = pytest.mark.usefixtures("task_identity")

Model = Callable[[ArrayRecord, int, int], ArrayRecord]


class TwoSiteGrid:
    """Two sites that answer at once: a train message with ``model(sent, round,
    node)``, an evaluate message with a metric. It keeps what every message
    carried, by global round. With ``stop_after`` the coordinator "crashes"
    when it asks for a later round."""

    def __init__(self, model: Model, stop_after: int | None = None) -> None:
        self.model = model
        self.stop_after = stop_after
        self.trained: dict[int, ArrayRecord] = {}
        self.evaluated: dict[int, ArrayRecord] = {}
        self.rates: dict[int, float | None] = {}

    def get_node_ids(self) -> list[int]:
        """Nodes 1 and 2 (FedAvg weights of 1/2: exact in binary)."""
        return [1, 2]

    def get_nodes(self) -> list[SimpleNamespace]:
        """The nodes, without registered names (as in simulation)."""
        return [SimpleNamespace(node_id=n) for n in self.get_node_ids()]

    def send_and_receive(self, messages: list[Message], timeout: float = 0.0):
        """Every site's reply to ``messages``."""
        messages = list(messages)
        rounds = {int(m.content[wire.CONFIG][wire.GLOBAL_ROUND]) for m in messages}
        if self.stop_after is not None and max(rounds) > self.stop_after:
            raise Crash(f"stopped before round {max(rounds)}")
        return [self._answer(m) for m in messages]

    def _answer(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        config = msg.content[wire.CONFIG]
        rnd = int(config[wire.GLOBAL_ROUND])
        arrays = msg.content[wire.ARRAYS]
        site = ConfigRecord({wire.SITE_NAME: f"site-{node}"})
        if msg.metadata.message_type == "evaluate":
            self.evaluated[rnd] = arrays
            metrics = {wire.dice_key("kidney"): 0.5, wire.NUM_VAL_CASES: 2}
            content = {wire.METRICS: MetricRecord(metrics), wire.SITE: site}
            return fake_reply(node, RecordDict(content))
        self.trained[rnd] = arrays
        self.rates[rnd] = config.get(wire.LEARNING_RATE)
        metrics = {wire.NUM_EXAMPLES: 4, wire.REFUSED: 0, wire.DP_ENABLED: 0}
        content = {
            wire.ARRAYS: self.model(arrays, rnd, node),
            wire.METRICS: MetricRecord(metrics),
            wire.SITE: site,
        }
        return fake_reply(node, RecordDict(content))


class Crash(RuntimeError):
    """The coordinator stopped mid-run."""


def _values(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: arrays[k].numpy() for k in arrays.keys()}


# -- the moving average, by hand ------------------------------------------------------

GLOBALS = {1: 1.0, 2: 2.0, 3: 4.0}  # each round's aggregate (both sites agree)


def _fixed(sent: ArrayRecord, rnd: int, node: int) -> ArrayRecord:
    """Both sites send GLOBALS[rnd], and a counter buffer of 10 x round."""
    return ArrayRecord(
        {
            "w": Array(np.full((2, 2), GLOBALS[rnd], np.float32)),
            "n": Array(np.array([10 * rnd], np.int64)),
        }
    )


def _wrapper(decay: float, rates=None) -> SiteAwareStrategy:
    return SiteAwareStrategy(
        build_strategy("fedavg", min_sites=2, fraction_evaluate=1.0),
        min_sites=2,
        round_offset=0,
        base_config={},
        on_round_end=lambda rec, arrays: None,
        ema_decay=decay,
        learning_rates=rates,
    )


def test_ema_after_three_rounds_is_the_hand_computation_and_is_what_sites_evaluate():
    d = 0.75
    s = _wrapper(d)
    grid = TwoSiteGrid(_fixed)
    start = _fixed(ArrayRecord(), 1, 0)
    result = s.start(grid=grid, initial_arrays=start, num_rounds=3)

    ema = {1: GLOBALS[1]}  # started from the first aggregate
    for r in (2, 3):
        ema[r] = d * ema[r - 1] + (1 - d) * GLOBALS[r]
    assert ema[3] == 1.9375  # the hand computation is exact in binary
    for r in (1, 2, 3):  # the sites evaluated the average, exactly
        got = _values(grid.evaluated[r])
        assert np.array_equal(got["w"], np.full((2, 2), ema[r], np.float32)), r
        assert got["w"].dtype == np.float32
        assert np.array_equal(got["n"], [10 * r])  # counters copied, not averaged
    for r in (2, 3):  # training continued from the raw aggregate
        assert np.all(_values(grid.trained[r])["w"] == GLOBALS[r - 1])
    final = s.ema_state()
    assert torch.equal(final["w"], torch.full((2, 2), ema[3]))
    assert np.all(_values(result.arrays)["w"] == GLOBALS[3])  # Flower's: the raw


def test_without_ema_decay_sites_evaluate_the_raw_aggregate():
    s = _wrapper(0.0)
    grid = TwoSiteGrid(_fixed)
    s.start(grid=grid, initial_arrays=_fixed(ArrayRecord(), 1, 0), num_rounds=3)
    assert s.ema_state() is None
    for r in (1, 2, 3):
        assert np.all(_values(grid.evaluated[r])["w"] == GLOBALS[r])
        assert grid.rates[r] is None  # the constant schedule sends no rate


def test_ema_refuses_an_aggregate_of_another_model():
    ema = ParameterEMA(0.5, {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="keys differ"):
        ema.update({"v": torch.zeros(2)})
    with pytest.raises(ValueError, match="w:"):
        ema.update({"w": torch.zeros(3)})


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_ema_decay_out_of_range_is_a_plan_error(bad):
    with pytest.raises(ConfigError, match="ema-decay") as err:
        load_plan({"ema-decay": bad})
    assert "below 1" in str(err.value) and "0 turns the average off" in str(err.value)
    assert load_plan({"ema-decay": 0.99}).ema_decay == 0.99


# -- the learning rate of each round ---------------------------------------------------


def test_cosine_rates_per_round_hand_computed_and_as_torch_anneals():
    plan = Plan(
        **{"lr-schedule": "cosine", "learning-rate": 0.01, "num-server-rounds": 5}
    )
    got = [round_learning_rate(plan, r) for r in range(1, 6)]
    c = math.sqrt(0.5)  # cos(pi / 4)
    hand = [0.01, 0.001 + 0.009 * (1 + c) / 2, 0.0055, 0.001 + 0.009 * (1 - c) / 2]
    assert got == pytest.approx([*hand, 0.001], rel=1e-12, abs=0)
    # torch's CosineAnnealingLR, one step per round, agrees
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.001)
    ref = []
    for _ in range(5):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert got == pytest.approx(ref, rel=1e-9)
    # the constant schedule sends nothing; one round stays at the plan's rate
    assert learning_rates(Plan()) is None
    one = plan.model_copy(update={"num_server_rounds": 1})
    assert round_learning_rate(one, 1) == 0.01


@pytest.mark.parametrize(
    "override, key",
    [
        ({"lr-schedule": "step"}, "lr-schedule"),
        ({"lr-min-factor": 0.0}, "lr-min-factor"),
        ({"lr-min-factor": 1.5}, "lr-min-factor"),
    ],
)
def test_bad_schedule_keys_are_plan_errors(override, key):
    with pytest.raises(ConfigError, match=key):
        load_plan(override)


def test_train_messages_carry_the_global_rounds_rate():
    plan = Plan(**{"lr-schedule": "cosine", "num-server-rounds": 3})
    s = _wrapper(0.0, rates=learning_rates(plan))
    s.round_offset = 1  # resumed after round 1: local round 1 is global round 2
    grid = TwoSiteGrid(lambda sent, rnd, node: _fixed(sent, rnd - 1, node))
    s.start(grid=grid, initial_arrays=_fixed(ArrayRecord(), 1, 0), num_rounds=2)
    assert grid.rates == {2: round_learning_rate(plan, 2), 3: 0.01 * 0.1}
    assert grid.rates[2] == pytest.approx(0.0055, rel=1e-12)


# -- across a resume: the app's round loop, checkpoints, start point ------------------

RESUME_PLAN = {
    "ema-decay": 0.5,
    "lr-schedule": "cosine",
    "num-server-rounds": 4,
    "min-sites": 2,
}


def _step(sent: ArrayRecord, rnd: int, node: int) -> ArrayRecord:
    """A site's update that depends on the model it got, the round and the site."""
    return ArrayRecord(
        {
            k: Array(v + np.float32(0.01 * rnd * node + 0.003 * rnd**2))
            for k, v in _values(sent).items()
        }
    )


def _run(run_dir: Path, resume: bool, stop_after=None, keep_ema: bool = True):
    """The app's round loop in ``run_dir`` (stopped after ``stop_after``
    rounds); the grid and the run's model."""
    run_dir.mkdir(exist_ok=True)
    plan = Plan(**{**RESUME_PLAN, "resume": resume})
    start = start_point(plan, run_dir)
    if not keep_ema:
        start = replace(start, ema=None)
    grid = TwoSiteGrid(_step, stop_after)
    status = RunStatus(run_dir, plan.num_server_rounds, start.done)
    meta = RunMeta(plan, {"source": "plan"})
    reports = SimpleNamespace(request=lambda: None)
    try:
        _, final = run_rounds(grid, plan, run_dir, start, {}, meta, status, reports)
    except Crash:
        return grid, None
    return grid, final


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, one stopped after round 2 and resumed, and one
    resumed without its average; run once for the tests below."""
    from flwr.supercore.task_identity import TaskIdentity

    base = tmp_path_factory.mktemp("recipe")
    with pytest.MonkeyPatch.context() as mp:  # as the task_identity fixture
        for attr in ("_run_id", "_task_id", "_node_id"):
            mp.setattr(TaskIdentity, attr, 1, raising=False)
        straight = _run(base / "straight", resume=False)
        _run(base / "resumed", resume=False, stop_after=2)  # stopped ...
        resumed = _run(base / "resumed", resume=True)  # ... and resumed
        _run(base / "cold", resume=False, stop_after=2)
        cold = _run(base / "cold", resume=True, keep_ema=False)
    return base, straight, resumed, cold


def test_resumed_run_continues_the_same_moving_average(runs):
    base, (_, straight), (_, resumed), (_, cold) = runs
    ckpt = base / "resumed" / "checkpoints"
    raw, meta = load_checkpoint(ckpt)
    ema = load_ema(ckpt, meta)
    ref_raw, ref_meta = load_checkpoint(base / "straight" / "checkpoints")
    ref_ema = load_ema(base / "straight" / "checkpoints", ref_meta)
    assert meta["round"] == 4 and ema is not None
    for k in ref_ema:
        assert torch.equal(ema[k], ref_ema[k]), k
        assert torch.equal(raw[k], ref_raw[k]), k
    # the run's model is the average, and the average is not the raw model
    assert all(np.array_equal(resumed[k].numpy(), ema[k].numpy()) for k in ema)
    assert all(np.array_equal(straight[k].numpy(), ema[k].numpy()) for k in ema)
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    # an average restarted at the resume differs: the test can fail
    assert any(
        not np.array_equal(cold[k].numpy(), ema[k].numpy())
        for k in ema
        if ema[k].is_floating_point()
    )


def test_resumed_run_sends_the_global_rounds_rates(runs):
    _, (straight, _), (resumed, _), _ = runs
    plan = Plan(**RESUME_PLAN)
    want = {r: round_learning_rate(plan, r) for r in (1, 2, 3, 4)}
    assert straight.rates == want
    assert resumed.rates == {3: want[3], 4: want[4]}  # not rounds 1 and 2's
    assert want[4] == pytest.approx(0.001) and want[1] == 0.01


def test_damaged_moving_average_is_refused_on_resume(runs, tmp_path):
    base, *_ = runs
    _, meta = load_checkpoint(base / "straight" / "checkpoints")
    assert meta["ema_weights"] == "round-0004.ema.pt"
    (tmp_path / meta["ema_weights"]).write_bytes(b"broken")
    with pytest.raises(CheckpointError, match="checksum"):
        load_ema(tmp_path, meta)
