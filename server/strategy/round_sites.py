"""Who was asked in a round, under which name, and who never answered.

Identity comes from the connection, not from the reply. In deployment each
node authenticates with the key the consortium registered under a site name
(``flwr supernode register KEY.pub --name SITE``): that registration binds the
node to its name, and the reply is known by it whatever it declares. A reply
that declares another name is rejected (a node cannot speak for another site);
so is every reply from a node whose registered name another node also holds
(Flower does not keep registered names unique), until the consortium
unregisters one. Nodes without a registered name (the simulation) are known by
the name the site declares, if it is a name a site YAML allows (anything else
is the site's own text: such a reply is known by its node, ``node-<id>``, and
the contract rejects it); two replies that declare one name are both rejected
(``server/strategy/reply_filter.py``). The SuperLink answers for a dead node
with an error reply from itself, which is mapped back to the node through the
request it answers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from common import wire
from common.contract import declared_name, safe_text
from server.reporting.round_record import RoundRecord
from server.strategy.replies import part
from server.strategy.reply_filter import SiteIdentityError

log = logging.getLogger("kidneyfl.server")


class RoundSites:
    """The sites of the current request: names, who was asked, who is silent.

    Parameters
    ----------
    names : dict, optional
        Registered node names by node id; replies' declared names are used
        for nodes without one.
    """

    def __init__(self, names: dict[int, str] | None = None) -> None:
        self.names = dict(names or {})
        self._asked: list[Message] = []
        self._warned: set[str] = set()
        # node -> rounds whose update was not used (told to the site), and the
        # same by site name, for a node known by name (a resumed run's rounds)
        self.unused: dict[int, list[int]] = {}
        self.unused_by_name: dict[str, list[int]] = {}

    def shared_names(self) -> dict[str, list[int]]:
        """Registered names held by more than one node, with their nodes."""
        nodes: dict[str, list[int]] = {}
        for node, name in self.names.items():
            nodes.setdefault(name, []).append(int(node))
        return {n: sorted(ids) for n, ids in nodes.items() if len(ids) > 1}

    def refresh(self, grid: Any) -> None:
        """Learn the registered names of the grid's nodes.

        A site that (re)joins mid-run keeps its registered name.
        """
        get_nodes = getattr(grid, "get_nodes", None)
        if get_nodes is None:
            return
        # Kept for the whole run (Flower lists online nodes only): a name two
        # nodes held at any time in this run stays shared until a new run,
        # so a second node cannot speak for a site while the first is away.
        for node in get_nodes():
            name = getattr(node, "name", None)
            if name:
                self.names[node.node_id] = str(name)
        for name, ids in self.shared_names().items():
            if name not in self._warned:
                self._warned.add(name)
                log.error(
                    "nodes %s are all registered as site %s: their replies are "
                    "rejected until the consortium unregisters all but one "
                    "(flwr supernode unregister NODE_ID)",
                    ", ".join(map(str, ids)),
                    safe_text(name, 64),
                )

    def ask(self, messages: Iterable[Message]) -> list[Message]:
        """Remember the messages of this request (as a list) and return them,
        each telling its node which of its rounds were not used."""
        self._asked = self.tell_unused(messages)
        return self._asked

    def node_of(self, reply: Message) -> int:
        """The node a reply is about, mapped back through its request."""
        # Flower fills message ids in when it sends the messages we return.
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in self._asked}
        return asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def site_of(self, msg: Message) -> str:
        """The site's name: registered name first, else what the reply declares
        (if a site YAML would allow it), else ``node-<id>``.

        Raises
        ------
        SiteIdentityError
            If the node's registered name is held by another node too (at
            any time in this run), or the
            reply declares a name other than its node's registered name.
        """
        node = self.node_of(msg)
        if node in self.names:
            name = self.names[node]
            shared = self.shared_names().get(name)
            if shared:
                raise SiteIdentityError(
                    f"node-{int(node)}",
                    f"{len(shared)} nodes are registered as site {name}; the "
                    "consortium must unregister all but one",
                )
            declared = _declared(msg)
            if declared is not None and declared != name:
                raise SiteIdentityError(
                    name,
                    f"declares site {safe_text(declared, 64)!r} but its node is "
                    f"registered as {name}: a node speaks only for its own site "
                    "(if this is the site's own YAML name, make it match its "
                    "registration)",
                )
            return name
        site = None if msg.has_error() else part(msg, wire.SITE, ConfigRecord)
        if site is not None:
            name = declared_name(site.get(wire.SITE_NAME))
            if name and name != "unknown":
                return name
        return f"node-{int(node)}"

    def note_unused(
        self, rnd: int, replies: list[Message], used: Iterable[str], kept: bool
    ) -> None:
        """Remember, per asked node, that round ``rnd``'s update was not used:
        the round's aggregate was not kept (``kept`` False), or the node's
        update is not among ``used`` (rejected, refused, failed, silent).

        Over-telling is harmless: a site marks only rounds its own ledger
        spent on (``client.privacy.ledger.PrivacyLedger.mark_unused``).
        """
        used_nodes: set[int] = set()
        if kept:
            used = set(used)
            for msg in replies:
                try:
                    if self.site_of(msg) in used:
                        used_nodes.add(int(self.node_of(msg)))
                except Exception:  # noqa: BLE001 - a reply without a site is unused
                    continue
        for m in self._asked:
            node = int(m.metadata.dst_node_id)
            if node not in used_nodes:
                _add(self.unused.setdefault(node, []), rnd)

    def seed_unused(self, entries: Iterable[dict[str, Any]]) -> None:
        """On resume: the earlier rounds' unused updates by site name, from the
        run's ``metrics.jsonl`` (a round not aggregated: every site it names;
        else the sites that failed or were rejected). The sites reconnect as
        new nodes, so they are told by name once their registered name is
        known."""
        for e in entries:
            rnd = int(e["round"])
            kinds = ("failed", "rejected")
            if not e.get("aggregated"):
                kinds += ("train", "refused")
            for kind in kinds:
                for site in e.get(kind, {}):
                    _add(self.unused_by_name.setdefault(str(site), []), rnd)

    def _unused_for(self, node: int) -> list[int]:
        rounds = list(self.unused.get(node, []))
        for rnd in self.unused_by_name.get(self.names.get(node, ""), []):
            _add(rounds, rnd)
        return sorted(rounds)[-wire.MAX_UNUSED_ROUNDS :]

    def tell_unused(self, messages: Iterable[Message]) -> list[Message]:
        """The messages, each to a node with unused rounds carrying them in its
        own copy of the config record (Flower's strategies send every node the
        same record dict)."""
        out = []
        for m in messages:
            rounds = self._unused_for(int(m.metadata.dst_node_id))
            if not rounds or not m.has_content():
                out.append(m)
                continue
            content = RecordDict(dict(m.content.items()))
            config = ConfigRecord(dict(content.get(wire.CONFIG, ConfigRecord())))
            config[wire.UNUSED_ROUNDS] = list(rounds)
            content[wire.CONFIG] = config
            out.append(
                Message(
                    content=content,
                    dst_node_id=m.metadata.dst_node_id,
                    message_type=m.metadata.message_type,
                    group_id=m.metadata.group_id,
                )
            )
        return out

    def note_silent(self, rec: RoundRecord, replies: list[Message]) -> None:
        """Record, as failed, every asked site without a reply.

        Flower drops sites that do not answer before round-timeout silently.
        """
        answered = {self.node_of(m) for m in replies}
        asked = {m.metadata.dst_node_id for m in self._asked}
        for node in sorted(asked - answered):
            site = self.names.get(node, f"node-{node}")
            rec.failed.setdefault(site, "no reply within round-timeout")
            log.warning("site %s did not answer in round %d", site, rec.round)


def _declared(msg: Message) -> object:
    """The name a reply declares (any value), or None; a reply whose records
    cannot even be read declares nothing here (the contract rejects it)."""
    if msg.has_error():
        return None
    try:
        site = part(msg, wire.SITE, ConfigRecord)
        return None if site is None else site.get(wire.SITE_NAME)
    except Exception:  # noqa: BLE001 - judged by the contract, not here
        return None


def _add(rounds: list[int], rnd: int) -> None:
    """Add ``rnd`` once, keeping the last ``MAX_UNUSED_ROUNDS``."""
    if rnd not in rounds:
        rounds.append(rnd)
        del rounds[: -wire.MAX_UNUSED_ROUNDS]
