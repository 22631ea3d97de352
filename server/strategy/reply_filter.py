"""Replies the coordinator will not use: failures, refusals, and every reply
that breaks the wire contract.

The coordinator trusts nothing a site sends. Every reply of every request
(train, evaluate, the start evaluation, the fingerprint query, the fine-tune
round) is read inside its own catch-all (:func:`sort_replies`) and checked
against the contract (:func:`common.contract.check_received`): the records its
message type carries and no others, metric keys on the list and bounded in
number and length, counts that are whole numbers of patients up to
``max-site-examples``, arrays stored as numpy arrays whose bytes hold the
shape and dtype they claim (the update guard then holds them to the global
model's names, shapes and dtypes), a refusal code from the list. A reply that
fails any check, or raises anything while it is read, is rejected with a short
reason of our own (the site's text escaped), and the request goes on with the
others. Two replies that name one site are both rejected: neither can be told
from the other. A reply whose node is bound to a site (registered by the
consortium) but which declares another site's name, and every reply from a
node whose registered name another node also holds, is rejected
(:class:`SiteIdentityError`, raised by ``site_of``). What is left goes on to
the update guard (``server/strategy/guard.py``) or into the round record.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message, MetricRecord

from common import wire
from common.contract import ReplyRules, check_received, safe_text
from server.reporting.round_record import RoundRecord, refusal_text
from server.strategy.replies import metrics_of, part, received_view

log = logging.getLogger("kidneyfl.server")

# (site, reply, its metrics): a train reply that may enter the aggregate.
Candidate = tuple[str, Message, dict[str, float]]
SiteOf = Callable[[Message], str]

MAX_REASON = 300  # characters of a rejection reason in metrics.jsonl
DUPLICATE = "more than one reply in this request names this site"


class SiteIdentityError(ValueError):
    """A reply whose site cannot be trusted to be who it says.

    Parameters
    ----------
    site : str
        The name the reply is recorded under (its node's registered name, or
        ``node-<id>``).
    reason : str
        Why, in the coordinator's own words.
    """

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(reason)
        self.site = site
        self.reason = reason


@dataclass(frozen=True)
class Intake:
    """How the replies to one request are read.

    Parameters
    ----------
    message_type : str
        What the coordinator asked for (``train``, ``evaluate``, ``query``,
        ``train.finetune``): a reply's own metadata is the site's to set.
    rules : ReplyRules
        The plan's task, class count and ``max-site-examples``.
    """

    message_type: str
    rules: ReplyRules = field(default_factory=ReplyRules)


@dataclass
class Sorted:
    """The replies to one request, by what became of them."""

    accepted: list[Candidate] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def sort_replies(replies: list[Message], site_of: SiteOf, intake: Intake) -> Sorted:
    """Each reply accepted, refused, rejected or failed, each in its own
    catch-all, so no reply can stop the others being read."""
    out = Sorted()
    identities = [_identity(msg, site_of) for msg in replies]
    names = [site for site, _ in identities]
    twice = {name for name, n in Counter(names).items() if n > 1}
    for (site, impostor), msg in zip(identities, replies, strict=True):
        if impostor:
            out.rejected[site] = safe_text(impostor, MAX_REASON)
            continue
        if site in twice:
            out.rejected[site] = DUPLICATE
            continue
        try:
            _sort_one(out, site, msg, intake)
        except Exception as exc:  # noqa: BLE001 - one site never ends a run
            out.rejected[site] = f"reply could not be read ({type(exc).__name__})"
    for site, why in out.rejected.items():
        log.warning("%s reply from %s rejected: %s", intake.message_type, site, why)
    return out


def _identity(msg: Message, site_of: SiteOf) -> tuple[str, str | None]:
    """The reply's site (``site_of``) and, for a reply that cannot be trusted
    to be that site, why; its node when even ``site_of`` fails."""
    try:
        return site_of(msg), None
    except SiteIdentityError as err:
        return err.site, err.reason
    except Exception:  # noqa: BLE001 - the reply is rejected under its node
        return f"node-{safe_text(getattr(msg.metadata, 'src_node_id', '?'), 24)}", None


def _sort_one(out: Sorted, site: str, msg: Message, intake: Intake) -> None:
    if msg.has_error():
        out.failed[site] = safe_text(msg.error.reason, MAX_REASON)
        return
    view, problems = received_view(msg, intake.message_type)
    problems += check_received(view, site, intake.rules)
    if problems:
        out.rejected[site] = safe_text(
            "breaks the reply contract: " + "; ".join(problems[:3]), MAX_REASON
        )
        return
    metrics = metrics_of(msg)
    if metrics.get(wire.REFUSED, 0) == 1:
        out.refused[site] = refusal_text(msg)
        return
    out.accepted.append((site, msg, metrics))


def train_candidates(
    rec: RoundRecord,
    replies: list[Message],
    site_of: SiteOf,
    intake: Intake | None = None,
) -> list[Candidate]:
    """The train replies that may enter the aggregate; the others are recorded
    in ``rec`` as failed, refused or rejected."""
    result = sort_replies(replies, site_of, intake or Intake(wire.MSG_TRAIN))
    rec.failed.update(result.failed)
    rec.refused.update(result.refused)
    rec.rejected.update(result.rejected)
    for site, why in {**result.failed, **result.refused}.items():
        log.warning("site %s did not train in round %d: %s", site, rec.round, why)
    return result.accepted


def record_evaluation(
    rec: RoundRecord,
    replies: list[Message],
    site_of: SiteOf,
    intake: Intake | None = None,
) -> None:
    """Each evaluate reply's metrics into ``rec``, or why the site has none.

    A site that failed, refused or was rejected in training keeps that first
    reason.
    """
    result = sort_replies(replies, site_of, intake or Intake(wire.MSG_EVALUATE))
    for site, why in result.failed.items():
        rec.failed.setdefault(site, why)
    for site, why in result.refused.items():
        rec.refused.setdefault(site, f"evaluation: {why}")
        log.warning("site %s refused evaluation: %s", site, why)
    for site, why in result.rejected.items():
        rec.rejected.setdefault(site, f"evaluation: {why}")
    for site, _, metrics in result.accepted:
        rec.evaluate[site] = metrics


def query_results(
    replies: list[Message], site_of: SiteOf, intake: Intake
) -> tuple[dict[str, dict[str, Any]], Sorted]:
    """The accepted query replies' metrics by site, lists kept (fingerprints),
    and how every reply was sorted."""
    result = sort_replies(replies, site_of, intake)
    found = {}
    for site, msg, _ in result.accepted:
        record = part(msg, wire.METRICS, MetricRecord)
        found[site] = dict(record) if record is not None else {}
    return found, result
