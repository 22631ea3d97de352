"""The coordinator's wrapper: FedAvg numbers, refusals and the update guard."""

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    MetricRecord,
    RecordDict,
)

from common import wire
from server.reporting.round_record import RoundRecord
from server.strategy.aggregators import build_strategy
from server.strategy.updates import check_update
from server.strategy.wrapper import SiteAwareStrategy
from tests.fakes import FiveNodeGrid, fake_arrays, fake_reply, train_reply

pytestmark = pytest.mark.usefixtures("task_identity")


def _refusal(node, site, reason):
    return fake_reply(
        node,
        RecordDict(
            {
                wire.METRICS: MetricRecord({wire.REFUSED: 1, wire.NUM_EXAMPLES: 0}),
                wire.SITE: ConfigRecord(
                    {wire.SITE_NAME: site, wire.REFUSAL_REASON: reason}
                ),
            }
        ),
    )


def _wrapper(min_sites=1):
    ended: list[RoundRecord] = []
    s = SiteAwareStrategy(
        build_strategy("fedavg", min_sites=1, fraction_evaluate=1.0),
        min_sites=min_sites,
        round_offset=0,
        base_config={},
        on_round_end=lambda rec, arrays: ended.append(rec),
    )
    list(s.configure_train(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))
    return s, ended


def test_fedavg_hand_computed_two_sites():
    s, _ = _wrapper()
    arrays, _ = s.aggregate_train(
        1, [train_reply(1, "a", 1.0, 1), train_reply(2, "b", 4.0, 3)]
    )
    # (1 * 1 + 4 * 3) / 4 = 3.25
    assert np.allclose(arrays["w"].numpy(), 3.25)
    assert np.allclose(arrays["b"].numpy(), 3.25)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (fake_arrays(float("nan")), "NaN or Inf"),
        (fake_arrays(1.0, shape=(3, 2)), "shape"),
        (fake_arrays(1.0, dtype=np.float64), "dtype"),
        (ArrayRecord({"w": Array(np.ones((2, 2), np.float32))}), "keys differ"),
    ],
)
def test_bad_update_rejected_round_goes_on(bad, reason):
    s, _ = _wrapper()
    arrays, _ = s.aggregate_train(
        1, [train_reply(1, "good", 2.0, 2), train_reply(2, "bad", bad, 2)]
    )
    assert reason in s._current.rejected["bad"]
    assert "good" in s._current.train
    assert np.allclose(arrays["w"].numpy(), 2.0)  # only the good site


def test_refused_site_never_enters_the_aggregate():
    s, _ = _wrapper()
    replies = [
        train_reply(1, "a", 1.0, 1),
        _refusal(2, "b", "over budget"),
        fake_reply(3, error="node died"),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    assert s._current.refused == {"b": "over budget"}
    assert "node died" in s._current.failed["node-3"]
    assert np.allclose(arrays["w"].numpy(), 1.0)


def test_too_few_valid_updates_skip_the_round():
    s, _ = _wrapper(min_sites=2)
    arrays, metrics = s.aggregate_train(
        1, [train_reply(1, "a", 1.0, 1), _refusal(2, "b", "over budget")]
    )
    assert arrays is None and metrics is None and not s._current.aggregated


def test_check_update_accepts_matching():
    assert check_update(fake_arrays(0.0), fake_arrays(5.0)) is None
    assert "no model arrays" in check_update(fake_arrays(0.0), None)


def test_round_end_gets_weighted_eval_means():
    s, ended = _wrapper()
    list(s.configure_evaluate(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))
    ev = [
        fake_reply(
            1,
            RecordDict(
                {
                    wire.METRICS: MetricRecord(
                        {
                            wire.dice_key("kidney"): 0.5,
                            wire.NUM_VAL_CASES: 1,
                            wire.NUM_EXAMPLES: 3,
                        }
                    ),
                    wire.SITE: ConfigRecord({wire.SITE_NAME: "a"}),
                }
            ),
        ),
        fake_reply(
            2,
            RecordDict(
                {
                    wire.METRICS: MetricRecord(
                        {
                            wire.dice_key("kidney"): 0.9,
                            wire.NUM_VAL_CASES: 3,
                            wire.NUM_EXAMPLES: 9,
                        }
                    ),
                    wire.SITE: ConfigRecord({wire.SITE_NAME: "b"}),
                }
            ),
        ),
    ]
    means = s.aggregate_evaluate(1, ev)
    assert means[wire.dice_key("kidney")] == pytest.approx((0.5 + 0.9 * 3) / 4)
    assert ended and set(ended[0].evaluate) == {"a", "b"}


def test_central_dp_clips_and_adds_calibrated_noise():
    inner = build_strategy(
        "fedavg",
        1,
        1.0,
        "server-fixed",
        central_dp_noise=1.0,
        central_dp_clip=2.0,
        num_sites=2,
    )
    s = SiteAwareStrategy(
        inner,
        min_sites=1,
        round_offset=0,
        base_config={},
        on_round_end=lambda rec, arrays: None,
    )
    big = ArrayRecord(
        {
            "w": Array(np.zeros((100, 100), np.float32)),
            "b": Array(np.zeros(1, np.float32)),
        }
    )
    list(s.configure_train(1, big, ConfigRecord(), FiveNodeGrid()))
    update = ArrayRecord(
        {
            "w": Array(np.full((100, 100), 5.0, np.float32)),
            "b": Array(np.zeros(1, np.float32)),
        }
    )
    out, _ = s.aggregate_train(
        1, [train_reply(1, "a", update, 1), train_reply(2, "b", update, 1)]
    )
    w = out["w"].numpy()
    # each update (norm 500) is clipped to norm 2 -> mean entry 0.02; noise std
    # = noise * clip / sites = 1.0
    assert abs(w.mean() - 0.02) < 0.05
    assert w.std() == pytest.approx(1.0, rel=0.1)


def test_eval_means_leave_out_sites_that_withhold_or_refuse():
    s, ended = _wrapper()
    list(s.configure_evaluate(1, fake_arrays(0.0), ConfigRecord(), FiveNodeGrid()))

    def site(node: int, name: str, metrics: dict, **record) -> object:
        return fake_reply(
            node,
            RecordDict(
                {
                    wire.METRICS: MetricRecord(metrics),
                    wire.SITE: ConfigRecord({wire.SITE_NAME: name, **record}),
                }
            ),
        )

    kidney = wire.dice_key("kidney")
    replies = [
        site(1, "a", {kidney: 0.5, wire.NUM_VAL_CASES: 10, wire.NUM_EXAMPLES: 30}),
        site(2, "b", {kidney: 0.8, wire.NUM_VAL_CASES: 30, wire.NUM_EXAMPLES: 90}),
        # withheld by the site's choice: no Dice, and no weight in the mean
        site(3, "c", {wire.METRICS_WITHHELD: 1, wire.NUM_VAL_CASES: 3}),
        site(
            4,
            "d",
            {wire.REFUSED: 1, wire.NUM_EXAMPLES: 0},
            **{
                wire.REFUSAL_CODE: "data-unusable",
                wire.REFUSAL_REASON: wire.REFUSAL_CODES["data-unusable"],
            },
        ),
    ]
    means = s.aggregate_evaluate(1, replies)
    assert means[kidney] == pytest.approx((0.5 * 10 + 0.8 * 30) / 40)
    rec = ended[-1]
    assert "d" not in rec.evaluate and "[data-unusable]" in rec.refused["d"]
    assert rec.evaluate["c"][wire.METRICS_WITHHELD] == 1
