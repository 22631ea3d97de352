"""The SuperLink with two doors: the Fleet API for hospitals, the rest for operators.

Flower 1.42 serves its Fleet API (what SuperNodes call), its Control API
(register or remove site keys, submit an app whose server code then runs on
the coordinator, stop runs) and its Runtime API (the ServerApp's own calls)
from one FastAPI app on one ``--host``/``--port``; account authentication for
the Control API exists only in Flower's enterprise distribution
(``../shared/notes/flower-1.42.md``). Anyone who can reach the hospitals'
port and trusts the server certificate could administer the federation.

This module runs Flower's own app (``flwr.superlink.main.create_app``, the
same object ``flower-superlink`` serves) on two uvicorn listeners in one
process and one event loop:

- the **operators' listener** (``--host``/``--port`` of ``flower-superlink``,
  127.0.0.1:9093 by default): the whole app, and the app's lifespan (the
  database, the SuperExec that starts ServerApps, which calls the Runtime API
  here);
- the **hospitals' listener** (``--fleet-host``/``--fleet-port``,
  0.0.0.0:9092 by default): the same app behind :class:`FleetOnly`, which
  answers ``403`` to every path but ``/v1/fleet/...`` and ``/health``,
  before any of Flower's code sees the request.

Both use the consortium's TLS certificate. Run it with
``kidneyfl coordinator superlink`` (``server.deploy.superlink_command``).
Tested in ``tests/deployment/test_deployment.py``: a hospital's node, with
its valid key and the consortium's CA, is refused on every control path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

from common.logs import setup_logging

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("kidneyfl.server")

# What a SuperNode calls (flwr/supernode/fleet_http_*.py in 1.42: register,
# activate, heartbeat, pull/push messages and objects, get-run, get-fab), and
# the health probe. Nothing else reaches Flower from the hospitals' port.
FLEET_PREFIX = "/v1/fleet/"
HEALTH_PATH = "/health"
REFUSED = (
    b"this port serves the Fleet API only (the hospitals' SuperNodes); "
    b"control and runtime calls go to the operators' address"
)


def fleet_path(path: str) -> bool:
    """True for a path the hospitals' listener passes on to Flower.

    The path is taken as sent, not normalised: a path with ``..``, ``//``,
    ``%2e`` or a NUL is refused rather than interpreted.
    """
    if not isinstance(path, str) or any(
        bad in path for bad in ("..", "//", "%", "\\", "\x00")
    ):
        return False
    return path == HEALTH_PATH or (
        path.startswith(FLEET_PREFIX) and len(path) > len(FLEET_PREFIX)
    )


class FleetOnly:
    """ASGI middleware: pass Fleet API and health requests, refuse the rest.

    Parameters
    ----------
    app : ASGI application
        Flower's SuperLink app.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            # The operators' listener owns the lifespan; this one never runs it.
            raise RuntimeError("the hospitals' listener runs without a lifespan")
        if kind == "http" and fleet_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": REFUSED.decode()}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _servers(flower_argv: list[str], fleet_host: str, fleet_port: int) -> list[Any]:
    """Flower's app on the operators' listener and, behind FleetOnly, on the
    hospitals' listener."""
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    # Flower's own argument parsing and checks (TLS, node auth, database).
    sys.argv = ["flower-superlink", *flower_argv]
    config = _parse_superlink_lifespan_config()
    if (config.host, config.port) == (fleet_host, fleet_port):
        raise SystemExit("the operators' and the hospitals' listeners need two ports")
    app = create_app(config, SuperLinkLifespan)
    common = {
        "log_config": get_uvicorn_log_config(console_handler.level),
        "ssl_keyfile": config.ssl_keyfile,
        "ssl_certfile": config.ssl_certfile,
        "access_log": True,
    }
    operators = uvicorn.Config(
        app, host=config.host, port=config.port, lifespan="on", **common
    )
    hospitals = uvicorn.Config(
        FleetOnly(app), host=fleet_host, port=fleet_port, lifespan="off", **common
    )
    log.info(
        "hospitals' Fleet API on %s:%d (fleet paths only); operators' Control and "
        "Runtime APIs on %s:%d",
        fleet_host,
        fleet_port,
        config.host,
        config.port,
    )
    return [_Server(operators), _Server(hospitals)]


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to :func:`_serve` (one handler
    stops both listeners)."""

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


async def _serve(servers: list[Any]) -> None:
    loop = asyncio.get_running_loop()

    def stop(*_: object) -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    # The operators' listener starts first: its lifespan opens the database
    # before any SuperNode can call.
    first = asyncio.create_task(servers[0].serve())
    while not servers[0].started:
        if first.done():
            await first  # raises the start-up error
            return
        await asyncio.sleep(0.05)
    tasks = [first, asyncio.create_task(servers[1].serve())]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    stop()  # one listener gone (an error or a signal): stop the other too
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()


def main(argv: list[str] | None = None) -> int:
    """``python -m server.fleet_gate --fleet-host H --fleet-port P -- ARGS``,
    ARGS being ``flower-superlink``'s own."""
    parser = argparse.ArgumentParser(prog="kidneyfl-superlink", allow_abbrev=False)
    parser.add_argument("--fleet-host", default="0.0.0.0")
    parser.add_argument("--fleet-port", type=int, default=9092)
    parser.add_argument("flower_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    flower_args = [a for a in args.flower_args if a != "--"]
    setup_logging()
    servers = _servers(flower_args, args.fleet_host, args.fleet_port)
    asyncio.run(_serve(servers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
