"""Spent, not used: rounds whose update the coordinator did not use.

A site spends privacy budget when it trains, whatever becomes of its update.
When a round is discarded (too few valid updates, an aggregate that failed its
checks) or the site's own update is rejected or never arrives, the coordinator
says so with its next request to that site (``unused-rounds`` in the config
record, ``server/strategy/round_sites.py``). The site then marks those rounds
in its privacy ledger (:meth:`client.privacy.ledger.PrivacyLedger.mark_unused`)
and its audit log (decision ``not-aggregated``), and ``kidneyfl site privacy``
shows them.

The list is the coordinator's word, so it decides nothing: only rounds the
site's own ledger spent on in that run are marked, a mark never changes an
epsilon (what was spent stays spent), and a malformed list is refused with
the request (``client.request_guard.unused_rounds``). Flower-free.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from client.audit_log import AuditLog
from client.privacy.ledger import PrivacyLedger
from client.request_guard import run_id, unused_rounds
from client.request_refused import RequestRefused
from common import wire
from common.config import SiteConfig

log = logging.getLogger("kidneyfl.client")

DECISION = "not-aggregated"
REASON = (
    "spent, not used: the coordinator did not use this site's update of this "
    "round (round discarded, or the update rejected or lost)"
)


def note_unused(
    site: SiteConfig,
    cfg: Mapping[str, Any] | None,
    message_id: str,
    app_hash: str,
    epsilon: float | None,
) -> list[int]:
    """Mark the rounds the request says were not used; returns those newly marked.

    Nothing happens for a request without the key, a site without DP (no
    ledger spends), or a request whose run id or list is malformed (the
    request itself is refused by the request guard, with its code).
    """
    if not cfg or wire.UNUSED_ROUNDS not in cfg or not site.privacy.enabled:
        return []
    try:
        rid, rounds = run_id(cfg), unused_rounds(cfg)
    except RequestRefused:
        return []
    new = PrivacyLedger(site.state_dir, site.name).mark_unused(rid, list(rounds))
    audit = AuditLog(site.state_dir)
    for rnd in new:
        audit.append(
            site=site.name,
            run_id=rid,
            app_hash=app_hash,
            message_type=wire.MSG_TRAIN,
            round=rnd,
            message_id=message_id,
            decision=DECISION,
            reason=REASON,
            epsilon_before=epsilon,
            epsilon_after=epsilon,
            bytes_sent=0,
            where="app",
        )
    if new:
        log.warning(
            "site %s: the coordinator did not use this site's update of round(s) "
            "%s of run %s; the privacy spent on them stays spent (see "
            "`kidneyfl site privacy`)",
            site.name,
            ", ".join(map(str, new)),
            rid,
        )
    return new
