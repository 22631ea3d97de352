"""The site's edge: every reply it sends is checked against the wire
contract and recorded, and any failure becomes one fixed refusal.

:class:`Edge` is the one place where a request's answer leaves the site, in
every mode (see ``client/gate.py`` for the deployment hooks that use it):
whatever fails at the site (the round code, the privacy ledger, the audit
log, the contract check, the bundle's loading, the gate itself), the
coordinator gets a refusal with a stable code and that code's fixed sentence
(:func:`refusal`, ``common.wire.REFUSAL_CODES``), never an exception's text,
which may hold a path, a case id or a value from the data. The full cause
goes to the site's log and, when the audit log can be written, to the audit
log.

:func:`governed` wraps the ClientApp's handlers (``client/app.py``) so every
reply is checked (:func:`enforce`) and recorded (:func:`record`) where the app
runs, in simulation too. This module imports Flower, like ``client/app.py``
and ``client/gate.py``: the site's Flower boundary.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.audit_log import AuditLog
from client.contract import ReplyView, check_reply, expected_arrays
from client.governance import (
    SIMULATION_HASH,
    LedgerUnreadable,
    epsilon_or_none,
    spent_epsilon,
)
from client.unused_rounds import note_unused
from common import packing, wire
from common.config import ConfigError, Plan, SiteConfig, load_plan, load_site_config

log = logging.getLogger("kidneyfl.gate")

APP_HASH_ENV = "KIDNEYFL_APP_HASH"  # set by the gate once the bundle is approved
AUDITED_ENV = "KIDNEYFL_AUDITED_MESSAGE"  # message id the app itself recorded
BLOCKED_REASON = (
    "reply withheld by the site's wire-contract check; see the site's audit log"
)


# -- the reply: view, check, record ----------------------------------------------
def reply_view(reply: Message) -> ReplyView:
    """What ``reply`` would send: record kinds, array specs, metrics, site keys."""
    mtype = reply.metadata.message_type
    if reply.has_error():
        return ReplyView(mtype, {}, is_error=True, nbytes=len(reply.error.reason))
    content = reply.content
    records: dict[str, str] = {}
    for name in content.array_records:
        records[name] = "arrays"
    for name in content.metric_records:
        records[name] = "metrics"
    for name in content.config_records:
        records[name] = "config"
    arrays: dict[str, tuple[tuple[int, ...], str]] = {}
    nbytes = 0
    for rec in content.array_records.values():
        with contextlib.suppress(packing.PackError):  # malformed: checked as it is
            rec = packing.unpack_arrays(rec)  # noqa: PLW2901 - the arrays it carries
        for key, arr in rec.items():
            arrays[key] = (tuple(int(s) for s in arr.shape), str(arr.dtype))
            nbytes += len(arr.data)
    metrics = dict(content.metric_records.get(wire.METRICS, {}))
    site = dict(content.config_records.get(wire.SITE, {}))
    nbytes += len(json.dumps([metrics, site], default=str).encode())
    return ReplyView(mtype, records, arrays, metrics, site, nbytes=nbytes)


def refusal(msg: Message, site: str, code: str, reason: str | None = None) -> Message:
    """A kidneyfl refusal reply: a stable code and a sentence, nothing else.

    ``reason`` defaults to the code's fixed sentence (``wire.REFUSAL_CODES``);
    only text built from the site's own settings and numbers may replace it.
    """
    sentence = reason if reason is not None else wire.REFUSAL_CODES[code]
    content = RecordDict(
        {
            wire.METRICS: MetricRecord({wire.REFUSED: 1, wire.NUM_EXAMPLES: 0}),
            wire.SITE: ConfigRecord(
                {
                    wire.SITE_NAME: site,
                    wire.REFUSAL_CODE: code,
                    wire.REFUSAL_REASON: sentence[:2000],
                }
            ),
        }
    )
    return Message(content=content, reply_to=msg)


class FailedReply(RuntimeError):
    """The reply is an error: Flower caught an exception of the app.

    Flower writes the exception's class and text into an error reply's reason,
    so such a reply never leaves the site; the edge answers ``internal-error``
    and keeps the reason for the site's log and audit.
    """


def enforce(
    site: SiteConfig,
    plan: Plan | None,
    msg: Message,
    reply: Message,
    expected: dict | None = None,
) -> tuple[Message, str, str, int]:
    """Check ``reply`` against the contract: (reply to send, decision, why, bytes).

    A reply that breaks the contract is replaced by a refusal whose reason says
    only that it was withheld; the problems themselves stay in the audit log.

    Raises
    ------
    FailedReply
        If ``reply`` is an error reply (free text): the caller's :class:`Edge`
        answers it with a fixed refusal.
    """
    view = reply_view(reply)
    if view.is_error:
        raise FailedReply(
            f"error reply (code {reply.error.code}): {reply.error.reason[:2000]}"
        )
    if plan is None:
        # the run config is not a kidneyfl plan: only a plain refusal may leave
        refusal_only = view.metrics.get(wire.REFUSED) == 1 and not view.arrays
        problems = (
            check_reply(view, site.name, "segmentation", {}, 2)
            if refusal_only
            else ["the run config is not a kidneyfl plan"]
        )
    else:
        if expected is None:
            expected = expected_arrays(plan) if view.arrays else {}
        problems = check_reply(
            view, site.name, plan.task, expected, len(plan.class_names)
        )
    if problems:
        log.error("site %s: reply withheld: %s", site.name, "; ".join(problems))
        out = refusal(msg, site.name, "withheld", BLOCKED_REASON)
        return out, "blocked", "; ".join(problems), reply_view(out).nbytes
    if view.metrics.get(wire.REFUSED) == 1:
        return (
            reply,
            "refused",
            str(view.site.get(wire.REFUSAL_REASON, "")),
            view.nbytes,
        )
    return reply, "ran", "", view.nbytes


def _round(msg: Message) -> int | None:
    cfg = msg.content.config_records.get(wire.CONFIG, {}) if msg.has_content() else {}
    for key in (wire.GLOBAL_ROUND, wire.SERVER_ROUND):
        value = cfg.get(key)
        # the coordinator's value, recorded only when it is a plain round number
        if isinstance(value, int) and not isinstance(value, bool):
            return value if 0 <= value <= 10**9 else None
    return None


def record(
    site: SiteConfig,
    msg: Message,
    context: Context | None,
    where: str,
    decision: str,
    reason: str,
    eps_before: float | None,
    nbytes: int,
    app_hash: str | None = None,
    strict: bool = True,
) -> None:
    """One audit entry for the request ``msg``; the privacy ledger gives epsilon.

    ``strict``: the ledger must be read for epsilon after (it raises
    :class:`~client.governance.LedgerUnreadable` where it cannot be); False
    while refusing, where an unreadable ledger is recorded as None.
    """
    cfg = msg.content.config_records.get(wire.CONFIG, {}) if msg.has_content() else {}
    run_id = cfg.get(wire.RUN_ID, context.run_id if context else msg.metadata.run_id)
    AuditLog(site.state_dir).append(
        site=site.name,
        run_id=str(run_id)[:200],  # the coordinator's text, recorded, bounded
        app_hash=app_hash or os.environ.get(APP_HASH_ENV, SIMULATION_HASH),
        message_type=msg.metadata.message_type,
        round=_round(msg),
        message_id=msg.metadata.message_id,
        decision=decision,
        reason=reason,
        epsilon_before=eps_before,
        epsilon_after=spent_epsilon(site) if strict else epsilon_or_none(site),
        bytes_sent=nbytes,
        where=where,
    )


# -- the site's edge -------------------------------------------------------------
def failure_code(exc: BaseException) -> str:
    """The refusal code the coordinator sees for a failure that reached the edge.

    Only the site's own checks have a code of their own here; the round code's
    refusals (data, budget, request, the site's choices) are answered by the
    ClientApp before they get this far (``client.app.answer``, with
    ``client.refusals.refusal_code``), so anything else is unexpected.
    """
    if isinstance(exc, LedgerUnreadable):
        return "ledger-damaged"
    if isinstance(exc, ConfigError):
        return "config-invalid"
    return "internal-error"


def _cause(exc: BaseException) -> str:
    """``exc`` and what it was raised from, in full: for the site's own records."""
    text = f"{type(exc).__name__}: {exc}"
    if exc.__cause__ is not None:
        text += f" (from {type(exc.__cause__).__name__}: {exc.__cause__})"
    return text


class Edge:
    """Where one request's answer leaves the site: any failure, one fixed refusal.

    Every reply of the site passes here, in every mode: :func:`governed` runs
    the ClientApp's handlers through :meth:`run`, and the deployment hooks
    (:func:`_hooks`) run their own steps and the check of every reply Flower's
    runner pushes through it. The coordinator gets :func:`refusal` with a
    code and that code's fixed sentence; the exception, in full, goes to the
    site's log and, if it can be written, the audit log.

    Parameters
    ----------
    msg : Message
        The request being answered.
    context : Context | None
        Its context (the audit entry's run id).
    where : str
        ``app`` (the ClientApp) or ``gate`` (the deployment hooks), as the
        audit entry records it.
    site : SiteConfig | None
        The site, once known; without it the refusal names the site
        ``unknown`` and nothing is recorded (its state directory is unknown).
    eps0 : float | None
        Epsilon spent before the request, for the audit entry.
    app_hash : str | None
        The bundle's hash for the audit entry (default: the gate's, if set).
    """

    def __init__(
        self,
        msg: Message,
        context: Context | None,
        where: str,
        site: SiteConfig | None = None,
        eps0: float | None = None,
        app_hash: str | None = None,
    ) -> None:
        self.msg, self.context, self.where = msg, context, where
        self.site, self.eps0, self.app_hash = site, eps0, app_hash

    def run(self, step: Callable[[], Message]) -> Message:
        """``step()``'s reply, or the fixed refusal for whatever it raises."""
        try:
            return step()
        except Exception as exc:  # noqa: BLE001 - the edge: no exception passes
            return self.refuse(exc)

    def refuse(self, exc: BaseException) -> Message:
        """The fixed refusal for ``exc``; its text to the site's log and audit."""
        code = failure_code(exc)
        name = self.site.name if self.site is not None else "unknown"
        mid = self.msg.metadata.message_id
        kind = self.msg.metadata.message_type
        log.error(
            "site %s: %s request %s failed; answered %s",
            name,
            kind,
            mid,
            code,
            exc_info=exc,
        )
        reply = refusal(self.msg, name, code)
        if self.site is None:
            return reply
        try:
            record(
                self.site,
                self.msg,
                self.context,
                self.where,
                "failed",
                f"{code} ({wire.REFUSAL_CODES[code]}): {_cause(exc)}"[:4000],
                self.eps0,
                reply_view(reply).nbytes,
                app_hash=self.app_hash,
                strict=False,
            )
            os.environ[AUDITED_ENV] = mid
        except Exception:  # noqa: BLE001 - the refusal goes out unrecorded
            log.exception(
                "site %s: the audit log could not record %s request %s; it is "
                "answered %s all the same",
                name,
                kind,
                mid,
                code,
            )
        return reply


Handler = Callable[[Message, Context], Message]


def governed(
    site_path: Callable[[Context, Plan | None], Path],
) -> Callable[[Handler], Handler]:
    """Decorate a ClientApp handler: contract check and audit entry per reply.

    ``site_path(context, plan)`` finds the site YAML (``client.app``'s
    ``site_yaml``). If the site cannot be resolved the handler answers
    alone (it refuses with its own reason) and nothing is recorded, since the
    state directory is unknown. Everything runs inside the site's
    :class:`Edge`: the ledger read, the handler, the contract check and the
    audit entry; whichever fails, the reply is the fixed refusal.
    """

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def wrapper(msg: Message, context: Context) -> Message:
            edge = Edge(msg, context, "app")
            return edge.run(lambda: _governed(edge, handler, site_path, msg, context))

        return wrapper

    return decorate


def _governed(
    edge: Edge,
    handler: Handler,
    site_path: Callable[[Context, Plan | None], Path],
    msg: Message,
    context: Context,
) -> Message:
    """The handler's reply, checked and recorded (what :func:`governed` runs)."""
    try:
        plan: Plan | None = load_plan(context.run_config)
    except ConfigError:
        plan = None  # the coordinator's plan is refused; the refusal is recorded
    try:
        site = load_site_config(site_path(context, plan))
    except ConfigError:
        return handler(msg, context)  # no state directory to record in
    edge.site = site
    # Written when the request arrives, before any work (the ledger's read
    # included): a site that dies mid-round still has the request on record.
    record(site, msg, context, "app", "arrived", "", None, 0, strict=False)
    edge.eps0 = spent_epsilon(site)
    cfg = msg.content.config_records.get(wire.CONFIG) if msg.has_content() else None
    note_unused(
        site,
        cfg,
        msg.metadata.message_id,
        os.environ.get(APP_HASH_ENV, SIMULATION_HASH),
        edge.eps0,
    )
    reply = handler(msg, context)
    reply, decision, why, nbytes = enforce(site, plan, msg, reply)
    record(site, msg, context, "app", decision, why, edge.eps0, nbytes)
    os.environ[AUDITED_ENV] = msg.metadata.message_id
    return reply
