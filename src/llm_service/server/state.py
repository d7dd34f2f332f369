"""What the service is doing now; read by the servicer, the HTTP port and the metrics."""

from __future__ import annotations

import asyncio
import enum
import time
from typing import Any

from llm_service.api.v1 import llm_pb2 as pb
from llm_service.engine import Engine, PoolState
from llm_service.errors import UnavailableError

__all__ = ["Phase", "ServerState"]


class Phase(enum.Enum):
    LOADING = pb.SERVING_STATE_LOADING
    SERVING = pb.SERVING_STATE_SERVING
    DRAINING = pb.SERVING_STATE_DRAINING
    FAILED = pb.SERVING_STATE_FAILED


class ServerState:
    """The serving phase, the engine once loaded, and the Generate calls in flight.

    Attributes:
        calls: the task of every Generate call being served or waiting for a context.
        failure: why the engine failed for good (phase FAILED).
    """

    def __init__(self, pool_size: int) -> None:
        self.phase = Phase.LOADING
        self.engine: Engine | None = None
        self.pool_size = pool_size
        self.http_port = 0  # the health port once it listens (GetModelInfo tells clients)
        self.started_at = time.monotonic()
        self.calls: set[asyncio.Task[Any]] = set()
        self.failure: str | None = None

    @property
    def ready(self) -> bool:
        return self.phase is Phase.SERVING

    @property
    def in_flight(self) -> int:
        return len(self.calls)

    def pool_state(self) -> PoolState | None:
        return self.engine.pool_state() if self.engine is not None else None

    def serving_engine(self, *, while_draining: bool = False) -> Engine:
        """The engine, if requests are admitted (or, with ``while_draining``, still loaded).

        Raises:
            UnavailableError: still loading, or draining (unless ``while_draining``).
        """
        if self.engine is not None and (while_draining or self.phase is Phase.SERVING):
            return self.engine
        if self.phase is Phase.DRAINING:
            raise UnavailableError("the server is shutting down; send the request to another one")
        if self.phase is Phase.FAILED:
            raise UnavailableError(
                f"the server's engine failed ({self.failure}); it restarts: send the request to"
                " another one"
            )
        raise UnavailableError("the server is still loading its model; retry shortly")
