"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib

from llm_service.engine import Engine, Finished, GenerationEvent, GenerationRequest, TokenDelta


async def collect(engine: Engine, request: GenerationRequest) -> list[GenerationEvent]:
    """Run a request to the end and return all its events."""
    async with contextlib.aclosing(engine.generate(request)) as stream:
        return [e async for e in stream]


def final(events: list[GenerationEvent]) -> Finished:
    last = events[-1]
    assert isinstance(last, Finished), f"stream did not end with Finished: {last!r}"
    return last


def deltas(events: list[GenerationEvent]) -> list[TokenDelta]:
    return [e for e in events if isinstance(e, TokenDelta)]
