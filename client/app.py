"""The site's Flower ClientApp: ``train``, ``evaluate``, fine-tune, fingerprint.

Each handler hands its message to :func:`answer`, which turns it into a
Flower-free :class:`client.prepare.Request`, lets the round code answer it
(``client/train_round.py``, ``client/evaluate_round.py``, after the one
preparation step of ``client/prepare.py``) and packs the answer into the reply.
Only model arrays and aggregate metrics leave through these replies, each
listed in docs/privacy.md with what protects it. Every failure of every request
is answered the same way: a stable code and a fixed sentence; the full cause
goes to the site's own log and audit only. The known refusals (data, ledger,
budget, request, configuration, the site's own choice) are answered here with
their own code (:mod:`client.refusals`); anything else, and any failure of the
ledger read, the contract check or the audit log around the handler, is
answered by the site's one edge, :class:`client.edge.Edge`, which
:func:`client.edge.governed` runs every handler through.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.edge import governed, refusal
from client.evaluate_round import evaluate_round, fingerprint_round
from client.prepare import Reply, Request, site_config_path, site_name
from client.refusals import REFUSALS, public_sentence, refusal_code
from client.train_round import train_round
from common import packing, wire
from common.config import Plan
from common.logs import log_request

log = logging.getLogger("kidneyfl.client")
app = ClientApp()


def site_yaml(context: Context, plan: Plan | None) -> Path:
    """This node's site YAML (:func:`client.prepare.site_config_path`)."""
    return site_config_path(context.node_config, plan)


@app.train()
@governed(site_yaml)
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the global weights; reply with weights and aggregates."""
    return answer(msg, context, functools.partial(train_round, fine_tune=False))


@app.train(wire.FINE_TUNE_ACTION)
@governed(site_yaml)
def fine_tune(msg: Message, context: Context) -> Message:
    """Fine-tune the final global model locally; it stays at the site.

    The reply carries only the fine-tuned model's validation metrics (and the
    privacy spent): no arrays, nothing to aggregate.
    """
    return answer(msg, context, functools.partial(train_round, fine_tune=True))


@app.evaluate()
@governed(site_yaml)
def evaluate(msg: Message, context: Context) -> Message:
    """The task's validation metrics at this site (means only)."""
    return answer(msg, context, evaluate_round)


@app.query()
@governed(site_yaml)
def fingerprint(msg: Message, context: Context) -> Message:
    """Aggregate dataset statistics for the federated preprocessing plan.

    Sent only if the site shares its fingerprint and has at least its floor of
    usable patients (the coordinator may raise the floor, never lower it);
    otherwise a refusal.
    """
    return answer(msg, context, fingerprint_round)


def answer(
    msg: Message, context: Context, round_fn: Callable[[Request], Reply]
) -> Message:
    """``round_fn``'s answer to ``msg``, or a refusal with its code.

    Known refusals (data, ledger, budget, request, configuration, the site's
    own choice) keep their code and are logged here. Any other exception
    propagates to the site's edge (:class:`client.edge.Edge`, around every
    handler), which logs it in full and answers ``internal-error``: one place
    turns the unexpected into a refusal. Nothing of an exception's text
    reaches the coordinator, except a budget refusal's own epsilon numbers.
    """
    kind = msg.metadata.message_type
    try:
        return _reply(msg, round_fn(request(msg, context)))
    except REFUSALS as exc:
        log.warning("request %s refused: %s", kind, exc)
        code, detail, sentence = refusal_code(exc), str(exc), public_sentence(exc)
    name = site_name(context.run_config, context.node_config)
    log_request(name, kind, None, "refused", f"{code}: {detail}")
    return refusal(msg, name, code, sentence)


def request(msg: Message, context: Context) -> Request:
    """The Flower-free view of ``msg`` that the round code works on."""
    content = msg.content
    return Request(
        kind=msg.metadata.message_type,
        run_config=context.run_config,
        node_config=context.node_config,
        run_id=context.run_id,
        config=content.config_records.get(wire.CONFIG),
        global_weights=lambda: _global_weights(content),
    )


def _global_weights(content: RecordDict) -> dict:
    return packing.unpack_arrays(content[wire.ARRAYS]).to_torch_state_dict()


def _reply(msg: Message, reply: Reply) -> Message:
    content = RecordDict(
        {
            wire.METRICS: MetricRecord(reply.metrics),
            wire.SITE: ConfigRecord({wire.SITE_NAME: reply.site}),
        }
    )
    if reply.state is not None:  # one buffer on the wire
        content[wire.ARRAYS] = packing.pack_arrays(ArrayRecord(reply.state))
    return Message(content=content, reply_to=msg)
