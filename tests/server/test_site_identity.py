"""Identity from the connection, not from the reply (issue 32).

In deployment each node is bound, at registration, to one site name (the
consortium's ``flwr supernode register KEY.pub --name SITE``). The invariant:
a reply is used only under its own node's registered name, never under a name
it declares for itself; a node whose registered name another node also holds
is never used; and a site whose node declares its own name is not disturbed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.contract import ReplyRules
from server.strategy.aggregators import build_strategy
from server.strategy.wrapper import SiteAwareStrategy
from tests.fakes import NodeGrid, eval_reply, fake_arrays, train_reply

pytestmark = pytest.mark.usefixtures("task_identity")


@dataclass
class _Node:
    node_id: int
    name: str


class RegisteredGrid(NodeGrid):
    """A grid whose nodes carry the names the consortium registered."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__(list(names))
        self.names = names

    def get_nodes(self) -> list[_Node]:
        return [_Node(n, name) for n, name in self.names.items()]


def _strategy(names: dict[int, str]) -> SiteAwareStrategy:
    s = SiteAwareStrategy(
        build_strategy("fedavg", 1, 1.0),
        min_sites=1,
        round_offset=0,
        base_config={},
        on_round_end=lambda rec, arrays: None,
        norm_factor=1e9,  # the guard's norm test off: identity alone must hold
        max_site_weight=1.0,
        rules=ReplyRules(),
    )
    list(s.configure_train(1, fake_arrays(0.0), ConfigRecord(), RegisteredGrid(names)))
    return s


def test_a_node_cannot_send_a_1000x_update_under_another_sites_name():
    s = _strategy({1: "hospital-a", 2: "hospital-b", 3: "hospital-c"})
    replies = [
        train_reply(1, "hospital-a", 2.0, 10),
        train_reply(2, "hospital-a", 2000.0, 10),  # node 2 is hospital-b
        train_reply(3, "hospital-c", 2.0, 10),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    rec = s._current
    assert set(rec.train) == {"hospital-a", "hospital-c"}
    why = rec.rejected["hospital-b"]
    assert "declares site 'hospital-a'" in why and "registered as hospital-b" in why
    assert np.allclose(arrays["w"].numpy(), 2.0)
    # ... and in evaluation: its metrics never land under hospital-a's name.
    list(s.configure_evaluate(1, arrays, ConfigRecord(), RegisteredGrid(s.sites.names)))
    s.aggregate_evaluate(
        1,
        [
            eval_reply(1, "hospital-a", {"dice-kidney": 0.8, "cases-kidney": 4}),
            eval_reply(2, "hospital-a", {"dice-kidney": 0.0, "cases-kidney": 4}),
        ],
    )
    assert rec.evaluate["hospital-a"]["dice-kidney"] == pytest.approx(0.8)
    assert "hospital-b" in rec.rejected


def test_two_nodes_registered_under_one_name_are_both_rejected(caplog):
    s = _strategy({1: "hospital-a", 2: "hospital-a", 3: "hospital-c"})
    assert "nodes 1, 2 are all registered as site hospital-a" in caplog.text
    arrays, _ = s.aggregate_train(
        1,
        [
            train_reply(1, "hospital-a", 2000.0, 10),
            train_reply(2, "hospital-a", 2000.0, 10),
            train_reply(3, "hospital-c", 2.0, 10),
        ],
    )
    rec = s._current
    assert set(rec.train) == {"hospital-c"}
    for node in ("node-1", "node-2"):
        assert "2 nodes are registered as site hospital-a" in rec.rejected[node]
    assert np.allclose(arrays["w"].numpy(), 2.0)


def test_a_name_once_shared_stays_shared_for_the_run():
    # Flower lists online nodes only: a second node that holds a site's name
    # cannot speak for it while the first is away.
    s = _strategy({1: "hospital-a", 3: "hospital-c"})
    s.sites.refresh(RegisteredGrid({2: "hospital-a", 3: "hospital-c"}))
    s.aggregate_train(
        1,
        [train_reply(2, "hospital-a", 2.0, 10), train_reply(3, "hospital-c", 2.0, 10)],
    )
    assert "node-2" in s._current.rejected and set(s._current.train) == {"hospital-c"}


SITE_NAMES = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]


@settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    registered=st.lists(st.sampled_from(SITE_NAMES), min_size=1, max_size=5),
    declared=st.lists(
        st.one_of(
            st.none(),  # declares its own registered name
            st.sampled_from(SITE_NAMES),
            st.text(max_size=20),
        ),
        min_size=5,
        max_size=5,
    ),
)
def test_no_reply_is_used_under_a_name_not_bound_to_its_node(registered, declared):
    names = {i + 1: name for i, name in enumerate(registered)}
    s = _strategy(names)
    shared = {n for n in registered if registered.count(n) > 1}
    replies, claims = [], {}
    for node, name in names.items():
        claim = declared[node - 1]
        claim = name if claim is None else claim
        claims[node] = claim
        honest = claim == name
        replies.append(train_reply(node, claim, 2.0 if honest else 2000.0, 10))
    arrays, _ = s.aggregate_train(1, replies)
    rec = s._current
    for node, name in names.items():
        if name in shared:
            assert name not in rec.train and f"node-{node}" in rec.rejected
        else:  # used exactly when the node declared its own registered name
            assert (name in rec.train) == (claims[node] == name), (name, claims)
    for site in rec.train:
        assert site in names.values() and site not in shared
    if rec.aggregated:
        assert np.allclose(arrays["w"].numpy(), 2.0)  # no 1000x update got in
