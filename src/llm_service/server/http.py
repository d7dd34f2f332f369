"""The plain-HTTP port: ``/livez``, ``/readyz`` and ``/metrics`` for probes and scrapers."""

from __future__ import annotations

import dataclasses
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from llm_service.server.metrics import ServiceMetrics
from llm_service.server.state import ServerState

__all__ = ["start_http"]

logger = logging.getLogger(__name__)


def _app(state: ServerState, metrics: ServiceMetrics) -> web.Application:
    async def livez(request: web.Request) -> web.Response:
        # Answering at all proves the process and its event loop are alive.
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        pool = state.pool_state()
        body = {
            "status": state.phase.name.lower(),
            "ready": state.ready,
            "requests_in_flight": state.in_flight,
            "pool": dataclasses.asdict(pool) if pool is not None else None,
        }
        if state.failure is not None:
            body["reason"] = state.failure
        return web.json_response(body, status=200 if state.ready else 503)

    async def metrics_text(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_text)
    return app


async def start_http(
    host: str, port: int, state: ServerState, metrics: ServiceMetrics
) -> web.AppRunner:
    """Serve the health and metrics endpoints; ``await runner.cleanup()`` stops them."""
    runner = web.AppRunner(_app(state, metrics), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
