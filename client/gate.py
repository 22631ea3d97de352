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
- :func:`client.edge.governed` wraps the ClientApp's handlers
  (``client/app.py``) so every reply is checked and recorded where the app
  runs, in simulation too.

**One edge.** Whatever fails at the site (the round code, the privacy ledger,
the audit log, the contract check, the bundle's loading, the gate itself),
the coordinator gets the same kind of answer: a refusal with a stable code and
the code's fixed sentence (``client.edge.refusal``, ``common.wire.REFUSAL_CODES``),
never an exception's text, which may hold a path, a case id or a value from
the data. ``client.edge.Edge`` is that one place: ``governed`` runs every handler
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
import hashlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from flwr.app import Context, Message

from client.approved_source import import_approved
from client.contract import expected_arrays
from client.edge import APP_HASH_ENV, AUDITED_ENV, Edge, enforce, record
from client.governance import (
    AppRefused,
    check_approved,
    check_installed,
    spent_epsilon,
)
from common.config import ConfigError, Plan, SiteConfig, load_plan, load_site_config

log = logging.getLogger("kidneyfl.gate")

# Packages of the site's own kidneyfl that the bundle ships too: dropped from
# sys.modules before the bundle is loaded, so its own copies are imported.
BUNDLE_PACKAGES = ("client", "common", "server", "cli")


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
