"""Deadlines for sites that are slow to connect or have gone.

Flower's strategies (1.41 and 1.42) wait for ``min_available_nodes`` online
nodes with no deadline (``sample_nodes`` loops forever), and its SuperLink
marks a dead node offline only after two missed 30 s heartbeats. The
coordinator therefore keeps its own clock:

- before round 1, :func:`wait_for_sites` waits up to ``site-wait-timeout`` for
  the expected sites, then starts with those present if the plan's minimum is
  met;
- during the run, :class:`LivenessGrid` wraps the grid the strategy sees: when
  fewer than the minimum stay online for ``site-wait-timeout`` seconds it
  raises :class:`SitesGone`, and the coordinator stops with every completed
  round checkpointed (``resume=true`` continues later). It also collects
  replies every ``poll`` seconds instead of the 3 s of Flower's deployment
  grid, which is most of a short round's latency on a fast network.

Works on anything with ``get_node_ids()``, so it is tested without Flower.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from common.packing import pack_models, unpack_models

log = logging.getLogger("kidneyfl.server")


class SitesGone(RuntimeError):
    """Too few sites stayed online for the plan's minimum."""


def wait_for_sites(
    grid: Any,
    want: int,
    need: int,
    grace: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """Node ids once ``want`` sites are online, or ``need`` when ``grace`` ends.

    Raises
    ------
    SitesGone
        If fewer than ``need`` sites are online after ``grace`` seconds.
    """
    start = clock()
    announced = -1
    while True:
        ids = list(grid.get_node_ids())
        if len(ids) >= want:
            return ids
        waited = clock() - start
        if waited >= grace:
            if len(ids) >= need:
                log.warning(
                    "starting with %d of %d expected sites after waiting %.0f s",
                    len(ids),
                    want,
                    waited,
                )
                return ids
            raise SitesGone(
                f"only {len(ids)} site(s) connected within {grace:.0f} s, "
                f"{need} needed (min-sites); check that the hospitals' SuperNodes "
                "are running and registered, or lower min-sites"
            )
        if len(ids) != announced:
            log.info("waiting for sites: %d of %d online", len(ids), want)
            announced = len(ids)
        sleep(1.0)


class LivenessGrid:
    """A grid whose ``get_node_ids`` gives up when sites stay gone too long.

    Every other attribute is the wrapped grid's.
    """

    def __init__(
        self,
        grid: Any,
        need: int,
        grace: float,
        clock: Callable[[], float] = time.monotonic,
        poll: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._grid = grid
        self._poll = poll
        self._sleep = sleep
        self._need = need
        self._grace = grace
        self._clock = clock
        self._short_since: float | None = None

    def get_node_ids(self) -> Iterable[int]:
        """Online node ids; raises :class:`SitesGone` after too long below need."""
        ids = list(self._grid.get_node_ids())
        if len(ids) >= self._need:
            self._short_since = None
            return ids
        now = self._clock()
        if self._short_since is None:
            self._short_since = now
            log.warning(
                "only %d site(s) online, %d needed; waiting up to %.0f s",
                len(ids),
                self._need,
                self._grace,
            )
        elif now - self._short_since >= self._grace:
            raise SitesGone(
                f"only {len(ids)} site(s) online for {self._grace:.0f} s, "
                f"{self._need} needed (min-sites)"
            )
        return ids

    def send_and_receive(
        self, messages: Iterable[Any], *, timeout: float | None = None
    ) -> list[Any]:
        """Flower's ``Grid.send_and_receive`` contract, polling every ``poll`` s.

        Pushes the messages, then pulls replies until every message has one or
        ``timeout`` seconds have passed (no timeout: until every reply is in).
        """
        pending = set(self._grid.push_messages(pack_models(messages)))
        end = None if timeout is None else self._clock() + timeout
        replies: list[Any] = []
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(unpack_models(got))
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (end is not None and self._clock() >= end):
                break
            self._sleep(self._poll)
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
