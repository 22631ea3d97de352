"""Who was asked in a round, under which name, and who never answered.

A reply names its site by the node's registered name (deployment with
SuperNode authentication), else by the name the site declares, if it is a name
a site YAML allows (anything else is the site's own text: such a reply is
known by its node, ``node-<id>``, and the contract rejects it); the SuperLink
answers for a dead node with an error reply from itself, which is mapped back
to the node through the request it answers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message

from common import wire
from common.contract import declared_name
from server.reporting.round_record import RoundRecord
from server.strategy.replies import part

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

    def refresh(self, grid: Any) -> None:
        """Learn the registered names of the grid's nodes.

        A site that (re)joins mid-run keeps its registered name.
        """
        get_nodes = getattr(grid, "get_nodes", None)
        if get_nodes is None:
            return
        for node in get_nodes():
            name = getattr(node, "name", None)
            if name:
                self.names[node.node_id] = str(name)

    def ask(self, messages: Iterable[Message]) -> list[Message]:
        """Remember the messages of this request (as a list) and return them."""
        self._asked = list(messages)
        return self._asked

    def node_of(self, reply: Message) -> int:
        """The node a reply is about, mapped back through its request."""
        # Flower fills message ids in when it sends the messages we return.
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in self._asked}
        return asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def site_of(self, msg: Message) -> str:
        """The site's name: registered name first, else what the reply declares
        (if a site YAML would allow it), else ``node-<id>``."""
        node = self.node_of(msg)
        if node in self.names:
            return self.names[node]
        site = None if msg.has_error() else part(msg, wire.SITE, ConfigRecord)
        if site is not None:
            name = declared_name(site.get(wire.SITE_NAME))
            if name and name != "unknown":
                return name
        return f"node-{int(node)}"

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
