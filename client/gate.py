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

**One edge.** Whatever fails at the site (the round code, the privacy ledger,
the audit log, the contract check, the bundle's loading, the gate itself),
the coordinator gets the same kind of answer: a refusal with a stable code and
the code's fixed sentence (:func:`refusal`, ``common.wire.REFUSAL_CODES``),
never an exception's text, which may hold a path, a case id or a value from
the data. :class:`Edge` is that one place: :func:`governed` runs every handler
through it (simulation, and the bundle's handlers in deployment), and the
deployment hooks send every failure of theirs and every error reply of
Flower's runner through it. The full cause goes to the site's log and, when
the audit log can be written, to the audit log; when it cannot, that is
logged too and the fixed refusal still goes out. The one exception is the
approval refusal, an error reply that names the bundle's hash and the site.

**The code that runs is the code approved.** After Flower has installed the
bundle, or found its folder already installed, the gate compares the folder it
is about to load with the approved bytes, file by file
(:func:`client.governance.check_installed`), and refuses a folder that differs
as it refuses an unapproved bundle. The bundle's modules are then imported
only from their sources, each checked again against the approved SHA-256 as it
is read, never from a bytecode cache in the folder
(:func:`client.approved_source.import_approved`).

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
from typing import Any, NoReturn

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.approved_source import import_approved
from client.audit_log import AuditLog
from client.contract import ReplyView, check_reply, expected_arrays
from client.governance import (
    SIMULATION_HASH,
    AppRefused,
    LedgerUnreadable,
    check_approved,
    check_installed,
    epsilon_or_none,
    spent_epsilon,
)
from client.unused_rounds import note_unused
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


# -- the gate around Flower's ClientApp runner ------------------------------------
class _Task:
    """What the gate has seen of the one task this process runs."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        self.message: Message | None = None
        self.context: Context | None = None
        self.run: Any = None
        self.fab: Any = None
        self.client: Any = None
        self.plan: Plan | None = None
        self.expected: dict = {}
        self.eps0: float | None = None
        self.refused = False
        self.app_hash: str | None = None

    def edge(self, context: Context | None = None) -> Edge:
        """The site's edge for this task's request (see :class:`Edge`)."""
        assert self.message is not None
        received = getattr(self.fab, "content", None)
        digest = self.app_hash or (
            hashlib.sha256(received).hexdigest()
            if isinstance(received, bytes)
            else None
        )
        return Edge(
            self.message,
            context or self.context,
            "gate",
            self.site,
            self.eps0,
            digest,
        )


def _hooks(task: _Task, rc: Any) -> None:
    """Wrap the runner's pull, install and push steps (fail closed if missing).

    Each step's failures go through the task's :class:`Edge`: a failure of
    the gate before the bundle runs answers the fixed refusal and ends the
    task; an error reply of Flower's runner (the bundle failed to load or
    raised) is replaced by the fixed refusal as it is pushed.
    """
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
        task.client, task.message, task.context = client, message, context
        task.run, task.fab = run, fab
        try:
            task.eps0 = spent_epsilon(task.site)
        except Exception as exc:  # noqa: BLE001 - the edge answers it
            _answer_and_end(task, rc, push, task.edge().refuse(exc))
        return message, context, run, fab

    def install_from_fab(content: bytes, *args: Any, **kwargs: Any) -> Any:
        digest = hashlib.sha256(content).hexdigest()
        try:
            check_approved(task.site, getattr(task.fab, "hash_str", ""), content)
            task.app_hash = digest
            os.environ[APP_HASH_ENV] = digest
            # Everything the reply check needs, from the site's own code,
            # before the bundle's copies of the same packages are imported.
            try:
                task.plan = load_plan(task.context.run_config) if task.context else None
            except ConfigError:
                task.plan = None
            task.expected = expected_arrays(task.plan) if task.plan else {}
            for mod in list(sys.modules):
                if mod.split(".")[0] in BUNDLE_PACKAGES:
                    del sys.modules[mod]
            path = install(content, *args, **kwargs)  # installs, or reuses the folder
            folder = _load_folder(task, digest, path)
            approved = check_installed(task.site, digest, content, folder)
            import_approved(folder, approved)
        except AppRefused as exc:
            _refuse(task, rc, push, digest, str(exc))  # does not return
        except Exception as exc:  # noqa: BLE001 - the edge answers it
            _answer_and_end(task, rc, push, task.edge().refuse(exc))
        return path

    def push_message(client: Any, reply: Message, context: Context) -> None:
        msg = task.message
        if msg is None or task.refused:
            # The gate has answered this task itself; anything more would be
            # Flower's own error reply, whose reason is an exception's text.
            log.warning("site %s: a second reply to the task not sent", task.site.name)
            return
        checked = task.edge(context).run(lambda: _checked(task, msg, reply, context))
        push(client, checked, context)

    rc.pull_task_input = pull_task_input
    rc.install_from_fab = install_from_fab
    rc.push_message = push_message


def _checked(task: _Task, msg: Message, reply: Message, context: Context) -> Message:
    """The reply the gate lets out, recorded unless the app recorded it already."""
    checked, decision, why, nbytes = enforce(
        task.site, task.plan, msg, reply, task.expected
    )
    if checked is not reply or os.environ.get(AUDITED_ENV) != msg.metadata.message_id:
        record(task.site, msg, context, "gate", decision, why, task.eps0, nbytes)
    return checked


def _load_folder(task: _Task, digest: str, installed: Any) -> Path:
    """The folder Flower's runner loads the ClientApp from, as it computes it.

    The runner names that folder by the run's app id and version, and the
    install by the bundle's own: the two must be the one folder the gate
    checks.

    Raises
    ------
    AppRefused
        If the run names another app or version than the bundle it ships.
    """
    from flwr.common.config import get_project_dir

    run = task.run
    if run is None:
        raise RuntimeError("no run for the task: the app's folder is unknown")
    folder = Path(get_project_dir(run.fab_id, run.fab_version, digest))
    if installed is not None and os.path.realpath(installed) != os.path.realpath(
        folder
    ):
        log.error(
            "site %s: run %s names app %s %s, the bundle installs to %s",
            task.site.name,
            getattr(run, "run_id", "?"),
            run.fab_id,
            run.fab_version,
            installed,
        )
        raise AppRefused(
            f"site {task.site.name} refuses app bundle sha256:{digest}: the run "
            "names another app or version than the bundle's"
        )
    return folder


def _refuse(task: _Task, rc: Any, push: Callable, digest: str, reason: str) -> NoReturn:
    """Answer the request with an error reply naming the hash, record it, exit.

    The one reply that is not a :func:`refusal`: the coordinator must learn
    which bundle the site refuses. ``reason`` names the site and the hash only.
    """
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    log.error("%s", reason)
    if task.message is None or task.context is None:
        task.refused = True
        raise AppRefused(reason)
    reply = Message(
        Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=reason),
        reply_to=task.message,
    )
    try:
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
            strict=False,
        )
    except Exception:  # noqa: BLE001 - the refusal goes out unrecorded
        log.exception(
            "site %s: the audit log could not record the refusal of sha256:%s",
            task.site.name,
            digest,
        )
    _answer_and_end(task, rc, push, reply, f"refused: {reason}")


def _answer_and_end(
    task: _Task,
    rc: Any,
    push: Callable,
    reply: Message,
    why: str = "answered by the site's gate",
) -> NoReturn:
    """Push the gate's own answer, report the task completed, and exit.

    The task is reported *completed* (the site decided; nothing crashed), so
    the SuperNode hands the run's next message to a fresh task at once.
    Nothing of the bundle runs after this: Flower's runner never gets past
    the step the gate is in.
    """
    from flwr.common.constant import SubStatus
    from flwr.supercore.exit import ExitCode, flwr_exit

    task.refused = True
    push(task.client, reply, task.context)
    rc.push_task_output(task.client, task.context, SubStatus.COMPLETED, "")
    flwr_exit(ExitCode.SUCCESS, why)


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
