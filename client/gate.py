"""The site's gate: no bundle code runs before its hash is approved, and no
reply leaves unchecked or unrecorded.

Flower side of hospital governance (issue 10); the executor that launches the
gate is ``client/executor.py``. Two pieces:

- :func:`run_task` is Flower's ``flwr-clientapp`` runner
  (``run_clientapp``) with three hooks: after the task input is pulled it
  notes the message and the bundle; before the bundle is installed it checks
  the bundle's SHA-256 against the site YAML and, if it is not approved,
  answers with an error reply that names the hash, records the refusal and
  ends the task (nothing from the bundle was unpacked or imported); before a
  reply is pushed it checks it against the wire contract and records it.
- :func:`governed` wraps the ClientApp's handlers (``client/app.py``) so every
  reply is checked and recorded where the app runs, in simulation too.

This module imports Flower, like ``client/app.py``: it is the site's other
Flower boundary.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.audit_log import AuditLog
from client.contract import ReplyView, check_reply, expected_arrays
from client.governance import (
    SIMULATION_HASH,
    AppRefused,
    check_approved,
    spent_epsilon,
)
from common import wire
from common.config import ConfigError, Plan, SiteConfig, load_plan, load_site_config

log = logging.getLogger("kidneyfl.gate")

APP_HASH_ENV = "KIDNEYFL_APP_HASH"  # set by the gate once the bundle is approved
AUDITED_ENV = "KIDNEYFL_AUDITED_MESSAGE"  # message id the app itself recorded
# Packages of the site's own kidneyfl that the bundle ships too: dropped from
# sys.modules before the bundle is loaded, so its own copies are imported.
BUNDLE_PACKAGES = ("client", "common", "server", "cli")
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
        with contextlib.suppress(wire.PackError):  # malformed: checked as it is
            rec = wire.unpack_arrays(rec)  # noqa: PLW2901 - the arrays it carries
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
    """
    view = reply_view(reply)
    if view.is_error:
        return reply, "failed", reply.error.reason[:500], view.nbytes
    if plan is None:
        problems = ["the run config is not a kidneyfl plan"]
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
        if key in cfg:
            return int(cfg[key])
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
) -> None:
    """One audit entry for the request ``msg``; the privacy ledger gives epsilon."""
    cfg = msg.content.config_records.get(wire.CONFIG, {}) if msg.has_content() else {}
    run_id = cfg.get(wire.RUN_ID, context.run_id if context else msg.metadata.run_id)
    AuditLog(site.state_dir).append(
        site=site.name,
        run_id=str(run_id),
        app_hash=app_hash or os.environ.get(APP_HASH_ENV, SIMULATION_HASH),
        message_type=msg.metadata.message_type,
        round=_round(msg),
        message_id=msg.metadata.message_id,
        decision=decision,
        reason=reason,
        epsilon_before=eps_before,
        epsilon_after=spent_epsilon(site),
        bytes_sent=nbytes,
        where=where,
    )


Handler = Callable[[Message, Context], Message]


def governed(
    site_path: Callable[[Context, Plan], Path],
) -> Callable[[Handler], Handler]:
    """Decorate a ClientApp handler: contract check and audit entry per reply.

    ``site_path(context, plan)`` finds the site YAML (``client.app``'s
    ``site_yaml``). If the site cannot be resolved the handler answers
    alone (it refuses with its own reason) and nothing is recorded, since the
    state directory is unknown.
    """

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def wrapper(msg: Message, context: Context) -> Message:
            try:
                plan = load_plan(context.run_config)
                site = load_site_config(site_path(context, plan))
            except ConfigError:
                return handler(msg, context)
            eps0 = spent_epsilon(site)
            try:
                reply = handler(msg, context)
            except Exception as exc:
                # the full cause stays here (site log and audit); the coordinator
                # gets a code and a fixed sentence, never the exception's text,
                # which may hold a path, a case id or a value from the data
                log.exception("site %s: request failed", site.name)
                record(site, msg, context, "app", "failed", type(exc).__name__, eps0, 0)
                os.environ[AUDITED_ENV] = msg.metadata.message_id
                return refusal(msg, site.name, "internal-error")
            reply, decision, why, nbytes = enforce(site, plan, msg, reply)
            record(site, msg, context, "app", decision, why, eps0, nbytes)
            os.environ[AUDITED_ENV] = msg.metadata.message_id
            return reply

        return wrapper

    return decorate


# -- the gate around Flower's ClientApp runner ------------------------------------
class _Task:
    """What the gate has seen of the one task this process runs."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        self.message: Message | None = None
        self.context: Context | None = None
        self.fab: Any = None
        self.client: Any = None
        self.plan: Plan | None = None
        self.expected: dict = {}
        self.eps0: float | None = None
        self.refused = False
        self.app_hash: str | None = None


def _hooks(task: _Task, rc: Any) -> None:
    """Wrap the runner's pull, install and push steps (fail closed if missing)."""
    for name in (
        "pull_task_input",
        "install_from_fab",
        "push_message",
        "run_clientapp",
    ):
        if not callable(getattr(rc, name, None)):
            raise RuntimeError(
                f"flwr {rc.__name__}.{name} not found: this Flower version is not the "
                "one the site's gate supports (1.42); the site runs nothing"
            )
    pull, install, push = rc.pull_task_input, rc.install_from_fab, rc.push_message

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = pull(client)
        task.client, task.message, task.context, task.fab = (
            client,
            message,
            context,
            fab,
        )
        task.eps0 = spent_epsilon(task.site)
        return message, context, run, fab

    def install_from_fab(content: bytes, *args: Any, **kwargs: Any) -> Any:
        digest = hashlib.sha256(content).hexdigest()
        try:
            check_approved(task.site, getattr(task.fab, "hash_str", ""), content)
        except AppRefused as exc:
            _refuse(task, rc, push, digest, str(exc))  # does not return
        task.app_hash = digest
        os.environ[APP_HASH_ENV] = digest
        # Everything the reply check needs, from the site's own code, before
        # the bundle's copies of the same packages are imported.
        try:
            task.plan = load_plan(task.context.run_config) if task.context else None
        except ConfigError:
            task.plan = None
        task.expected = expected_arrays(task.plan) if task.plan else {}
        for mod in list(sys.modules):
            if mod.split(".")[0] in BUNDLE_PACKAGES:
                del sys.modules[mod]
        return install(content, *args, **kwargs)

    def push_message(client: Any, reply: Message, context: Context) -> None:
        msg = task.message
        if msg is not None and not task.refused:
            checked, decision, why, nbytes = enforce(
                task.site, task.plan, msg, reply, task.expected
            )
            if checked is not reply or os.environ.get(AUDITED_ENV) != (
                msg.metadata.message_id
            ):
                record(
                    task.site, msg, context, "gate", decision, why, task.eps0, nbytes
                )
            reply = checked
        push(client, reply, context)

    rc.pull_task_input = pull_task_input
    rc.install_from_fab = install_from_fab
    rc.push_message = push_message


def _refuse(task: _Task, rc: Any, push: Callable, digest: str, reason: str) -> None:
    """Answer the request with an error reply naming the hash, record it, exit.

    The task is reported *completed* (the site decided; nothing crashed), so the
    SuperNode hands the run's next message to a fresh task at once.
    """
    from flwr.app import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.exit import ExitCode, flwr_exit

    task.refused = True
    log.error("%s", reason)
    if task.message is None or task.context is None:
        raise AppRefused(reason)
    reply = Message(
        Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=reason),
        reply_to=task.message,
    )
    record(
        task.site,
        task.message,
        task.context,
        "gate",
        "refused",
        reason,
        task.eps0,
        len(reason),
        app_hash=digest,
    )
    push(task.client, reply, task.context)
    rc.push_task_output(task.client, task.context, SubStatus.COMPLETED, "")
    flwr_exit(ExitCode.SUCCESS, f"refused: {reason}")


def run_task(site_yaml: str, args: argparse.Namespace) -> None:
    """One ClientApp task behind the approval check (what ``flwr-clientapp`` runs)."""
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime import run_clientapp as rc

    site = load_site_config(site_yaml)
    _hooks(_Task(site), rc)
    rc.run_clientapp(
        runtime_api_address=args.runtime_api_address,
        token=args.token,
        insecure=args.insecure,
        certificates=validate_and_resolve_root_certificates(
            args.root_certificates, args.insecure
        ),
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,  # the site runs only what IT installed
    )
