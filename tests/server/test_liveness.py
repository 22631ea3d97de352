"""Coordinator deadlines and crash recovery, without Flower processes."""

from __future__ import annotations

import json

import pytest

from server.liveness import LivenessGrid, SitesGone, wait_for_sites
from server.recovery import reconcile_metrics
from server.reporting.metrics_log import append_metrics, read_metrics


class FakeGrid:
    """Online node ids follow a script, one entry per call."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    def get_node_ids(self):
        ids = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return ids

    def get_nodes(self):
        return ["sentinel"]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def test_wait_returns_as_soon_as_expected_sites_are_online():
    clock = Clock()
    grid = FakeGrid([[1], [1, 2], [1, 2, 3]])
    ids = wait_for_sites(grid, want=3, need=2, grace=60, clock=clock, sleep=clock.sleep)
    assert ids == [1, 2, 3] and clock.t == 2.0


def test_wait_starts_with_the_minimum_after_the_grace_period():
    clock = Clock()
    grid = FakeGrid([[1, 2]])
    ids = wait_for_sites(grid, want=3, need=2, grace=10, clock=clock, sleep=clock.sleep)
    assert ids == [1, 2] and clock.t == pytest.approx(10.0)


def test_wait_gives_up_below_the_minimum():
    clock = Clock()
    with pytest.raises(SitesGone, match="only 1 site.*within 10 s, 2 needed"):
        wait_for_sites(FakeGrid([[1]]), 3, 2, 10, clock=clock, sleep=clock.sleep)
    assert clock.t == pytest.approx(10.0)  # not forever


def test_liveness_grid_raises_only_after_a_sustained_shortfall():
    clock = Clock()
    grid = LivenessGrid(FakeGrid([[1, 2], [1], [1], [1, 2], [1], [1]]), 2, 30, clock)
    assert grid.get_node_ids() == [1, 2]
    assert grid.get_node_ids() == [1]  # short: the clock starts
    clock.t = 29
    assert grid.get_node_ids() == [1]
    assert grid.get_node_ids() == [1, 2]  # back: the clock resets
    clock.t = 40
    assert grid.get_node_ids() == [1]
    clock.t = 70
    with pytest.raises(SitesGone, match="for 30 s, 2 needed"):
        grid.get_node_ids()
    assert grid.get_nodes() == ["sentinel"]  # everything else passes through


def _entry(r):
    return {"round": r, "weighted": {"dice-kidney": r / 10}}


def test_reconcile_drops_rounds_after_the_checkpoint_and_restores_missing(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for r in (1, 2, 3):
        (ckpt / f"round-{r:04d}.json").write_text(json.dumps({"entry": _entry(r)}))
    # Round 2's line was lost (crash between checkpoint and append); round 4's
    # line was written but its checkpoint never completed; a torn last line.
    for r in (1, 3, 4):
        append_metrics(tmp_path, _entry(r))
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 5, "weigh')
    assert reconcile_metrics(tmp_path, ckpt, done=3) == [1, 2, 3]
    assert [e["round"] for e in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path)[1] == _entry(2)
    # Idempotent: a second resume leaves the file as it is.
    before = (tmp_path / "metrics.jsonl").read_bytes()
    reconcile_metrics(tmp_path, ckpt, done=3)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before


class Meta:
    def __init__(self, reply_to):
        self.reply_to_message_id = reply_to


class Reply:
    def __init__(self, reply_to):
        self.metadata = Meta(reply_to)


class MessagingGrid(FakeGrid):
    """Replies to message ``i`` become available at pull number ``ready[i]``."""

    def __init__(self, ready):
        super().__init__([[1, 2, 3]])
        self.ready = ready
        self.pulls = 0
        self.asked = []

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.asked.append(sorted(ids))
        self.pulls += 1
        return [Reply(i) for i in sorted(ids) if self.ready[i] <= self.pulls]


def test_send_and_receive_polls_at_its_own_interval_until_every_reply():
    clock = Clock()
    fake = MessagingGrid({"m0": 1, "m1": 4, "m2": 2})
    grid = LivenessGrid(fake, 1, 30, clock, poll=0.25, sleep=clock.sleep)
    replies = grid.send_and_receive(["a", "b", "c"])
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    # Each reply is collected once; answered messages are not asked for again.
    assert fake.asked == [["m0", "m1", "m2"], ["m1", "m2"], ["m1"], ["m1"]]
    assert clock.t == pytest.approx(0.75)  # three 0.25 s waits, not 3 s ones


def test_send_and_receive_returns_what_it_has_at_the_timeout():
    clock = Clock()
    fake = MessagingGrid({"m0": 1, "m1": 10**9})
    grid = LivenessGrid(fake, 1, 30, clock, poll=0.5, sleep=clock.sleep)
    replies = grid.send_and_receive(["a", "b"], timeout=2.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 2.0 <= clock.t <= 2.5
