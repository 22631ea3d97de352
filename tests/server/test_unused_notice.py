"""Nothing spent in the dark (issue 33): the coordinator tells each site, with
its next request, which of its rounds' updates were not used."""

from __future__ import annotations

import math

import pytest
from flwr.app import ConfigRecord

from common import wire
from common.contract import ReplyRules
from server.strategy.aggregators import build_strategy
from server.strategy.wrapper import SiteAwareStrategy
from tests.fakes import NodeGrid, fake_arrays, fake_reply, train_reply

pytestmark = pytest.mark.usefixtures("task_identity")


def _strategy() -> SiteAwareStrategy:
    return SiteAwareStrategy(
        build_strategy("fedavg", 2, 1.0),
        min_sites=2,
        round_offset=0,
        base_config={wire.RUN_ID: "r.0"},
        on_round_end=lambda rec, arrays: None,
        norm_factor=1e9,
        max_site_weight=1.0,
        rules=ReplyRules(),
    )


def _told(messages) -> dict[int, list[int]]:
    return {
        m.metadata.dst_node_id: list(m.content[wire.CONFIG].get(wire.UNUSED_ROUNDS, []))
        for m in messages
    }


def test_sites_are_told_which_rounds_were_not_used():
    s, grid = _strategy(), NodeGrid([1, 2, 3])
    first = list(s.configure_train(1, fake_arrays(0.0), ConfigRecord(), grid))
    assert _told(first) == {1: [], 2: [], 3: []}
    # Round 1: one valid update, two needed: discarded; every site spent.
    s.aggregate_train(
        1,
        [
            train_reply(1, "a", 1.0, 10),
            train_reply(2, "b", math.nan, 10),  # rejected by the guard
            fake_reply(3, error="site died"),
        ],
    )
    assert not s._current.aggregated
    second = list(s.configure_train(2, fake_arrays(0.0), ConfigRecord(), grid))
    assert _told(second) == {1: [1], 2: [1], 3: [1]}
    # Each node has its own config record; the model is not copied.
    assert len({id(m.content[wire.CONFIG]) for m in second}) == 3
    arrays = {id(m.content[wire.ARRAYS]) for m in second}
    assert len(arrays) == 1
    assert all(m.content[wire.CONFIG][wire.RUN_ID] == "r.0" for m in second)
    # Round 2: aggregated, but site b's update rejected: only b hears of it.
    s.aggregate_train(
        2,
        [
            train_reply(1, "a", 1.0, 10),
            train_reply(2, "b", math.inf, 10),
            train_reply(3, "c", 1.0, 10),
        ],
    )
    assert s._current.aggregated
    third = list(s.configure_train(3, fake_arrays(1.0), ConfigRecord(), grid))
    assert _told(third) == {1: [1], 2: [1, 2], 3: [1]}
    # Evaluate requests carry it too (a site may not train again this run).
    evals = list(s.configure_evaluate(3, fake_arrays(1.0), ConfigRecord(), grid))
    assert _told(evals) == {1: [1], 2: [1, 2], 3: [1]}


def test_the_list_is_bounded():
    s = _strategy()
    for rnd in range(1, wire.MAX_UNUSED_ROUNDS + 30):
        list(s.configure_train(rnd, fake_arrays(0.0), ConfigRecord(), NodeGrid([7, 8])))
        s.aggregate_train(rnd, [])
    msgs = list(
        s.configure_train(999, fake_arrays(0.0), ConfigRecord(), NodeGrid([7, 8]))
    )
    told = _told(msgs)[7]
    assert (
        len(told) == wire.MAX_UNUSED_ROUNDS and told[-1] == wire.MAX_UNUSED_ROUNDS + 29
    )


def test_a_resumed_run_still_tells_sites_by_their_registered_name():
    from dataclasses import dataclass

    @dataclass
    class Node:
        node_id: int
        name: str

    class Registered(NodeGrid):
        def get_nodes(self):
            return [Node(21, "hospital-a"), Node(22, "hospital-b")]

    s = _strategy()
    s.sites.seed_unused(
        [
            {
                "round": 1,
                "aggregated": False,
                "train": {"hospital-a": {}},
                "failed": {"hospital-b": "x"},
            },
            {
                "round": 2,
                "aggregated": True,
                "train": {"hospital-a": {}},
                "rejected": {"hospital-b": "y"},
            },
            {
                "round": 3,
                "aggregated": True,
                "train": {"hospital-a": {}, "hospital-b": {}},
            },
        ]
    )
    msgs = list(
        s.configure_train(4, fake_arrays(0.0), ConfigRecord(), Registered([21, 22]))
    )
    assert _told(msgs) == {21: [1], 22: [1, 2]}
