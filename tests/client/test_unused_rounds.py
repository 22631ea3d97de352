"""Spent, not used (issue 33): a round the coordinator did not use is marked at
the site that spent on it, in its ledger and audit log; the coordinator's word
decides nothing else.

Invariants, for any ``unused-rounds`` a coordinator sends: the site's epsilon
is unchanged; only rounds the site's own ledger spent on in that run are
marked; a mark is never removed; a malformed list refuses the request.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.audit_log import AuditLog
from client.privacy.entries import LedgerEntry
from client.privacy.ledger import PrivacyLedger
from client.request_guard import check_request
from client.request_refused import RequestRefused
from client.unused_rounds import DECISION, note_unused
from common import wire
from common.config import Plan, load_site_config
from tests.fakes import write_site_yaml

RUN = "kits-2027.0a1b2c3d"


@pytest.fixture
def site(tmp_path):
    site = load_site_config(write_site_yaml(tmp_path, "hospital-a", generate=False))
    ledger = PrivacyLedger(site.state_dir, site.name)
    for rnd in (1, 2, 3):
        ledger.record(LedgerEntry(RUN, rnd, 1.1, 0.25, 8, "d"))
    ledger.record(LedgerEntry("other-run", 2, 1.1, 0.25, 8, "d"))
    return site


def _cfg(rounds, run=RUN) -> dict:
    return {wire.RUN_ID: run, wire.UNUSED_ROUNDS: rounds}


def test_unused_rounds_are_marked_in_ledger_and_audit_once(site):
    eps = PrivacyLedger(site.state_dir, site.name).epsilon(site.privacy.delta)
    new = note_unused(site, _cfg([2, 3, 9]), "m-1", "sha", eps)
    assert new == [2, 3]  # round 9 was never spent on at this site
    ledger = PrivacyLedger(site.state_dir, site.name)  # from disk
    assert ledger.unused == {RUN: [2, 3]}
    assert ledger.epsilon(site.privacy.delta) == pytest.approx(eps)  # unchanged
    entries = AuditLog(site.state_dir).entries()
    assert [(e["decision"], e["round"]) for e in entries] == [
        (DECISION, 2),
        (DECISION, 3),
    ]
    assert "spent, not used" in entries[0]["reason"]
    assert AuditLog(site.state_dir).verify().ok
    # told again with the next request: nothing new, nothing written twice
    assert note_unused(site, _cfg([2, 3]), "m-2", "sha", eps) == []
    assert len(AuditLog(site.state_dir).entries()) == 2
    summary = {r["run_id"]: r for r in ledger.runs_summary(site.privacy.delta)}
    assert summary[RUN]["unused_rounds"] == [2, 3]
    assert summary["other-run"]["unused_rounds"] == []


def test_a_site_without_dp_or_a_request_without_the_key_marks_nothing(tmp_path):
    site = load_site_config(
        write_site_yaml(tmp_path, "b", generate=False, privacy={"enabled": False})
    )
    assert note_unused(site, _cfg([1]), "m", "sha", None) == []
    assert note_unused(site, {wire.RUN_ID: RUN}, "m", "sha", None) == []
    assert not (site.state_dir / "audit-log.jsonl").exists()


@pytest.mark.parametrize(
    "value",
    [[0], [-1], [1.0], ["2"], [True], "1,2", list(range(1, 300)), [10**9]],
)
def test_a_malformed_list_refuses_the_request(site, value):
    cfg = {wire.RUN_ID: RUN, wire.SERVER_ROUND: 1, wire.UNUSED_ROUNDS: value}
    with pytest.raises(RequestRefused) as err:
        check_request("evaluate", cfg, Plan(), site)
    assert err.value.code == "request-invalid"
    # ... and the site marks nothing for it
    assert note_unused(site, cfg, "m", "sha", 0.0) == []
    assert PrivacyLedger(site.state_dir, site.name).unused == {}


@settings(
    max_examples=60,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    told=st.lists(
        st.tuples(
            st.sampled_from([RUN, "other-run", "never-ran"]),
            st.lists(st.integers(1, 12), max_size=8),
        ),
        max_size=4,
    )
)
def test_no_list_changes_epsilon_or_marks_a_round_not_spent(tmp_path_factory, told):
    tmp = tmp_path_factory.mktemp("s")
    site = load_site_config(write_site_yaml(tmp, "c", generate=False))
    ledger = PrivacyLedger(site.state_dir, site.name)
    for rnd in (1, 4):
        ledger.record(LedgerEntry(RUN, rnd, 1.3, 0.2, 5, "d"))
    ledger.record(LedgerEntry("other-run", 2, 1.3, 0.2, 5, "d"))
    history = list(ledger.history())
    marked: dict[str, set[int]] = {}
    for run, rounds in told:
        new = note_unused(site, _cfg(rounds, run), "m", "sha", 1.0)
        marked.setdefault(run, set()).update(new)
    after = PrivacyLedger(site.state_dir, site.name)
    assert list(after.history()) == history  # what was spent stays spent
    spent = {(e.run_id, e.round) for e in after.entries}
    for run, rounds in after.unused.items():
        assert {(run, r) for r in rounds} <= spent
        assert set(rounds) == marked[run]  # only what was told, never removed


def test_site_privacy_shows_spent_not_used(site):
    from client.cli import privacy_report

    note_unused(site, _cfg([1, 2, 3]), "m", "sha", 1.0)
    text = privacy_report(str(site.source))
    (line,) = [x for x in text.splitlines() if "spent, not used" in x]
    assert "round(s) 1-3" in line
    assert text.count("spent, not used") == 1  # the other run lost nothing
