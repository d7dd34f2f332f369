"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

from llm_service import errors
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


def run_llm_service(
    *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the ``llm_service`` command as a person would, without the caller's LLM_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    return subprocess.run(
        [sys.executable, "-m", "llm_service", *args],
        input=stdin, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def all_error_classes() -> set[type[errors.LLMServiceError]]:
    """Every error class of ``llm_service.errors``, however deep."""
    found: set[type[errors.LLMServiceError]] = set()
    todo = [errors.LLMServiceError]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.add(sub)
            todo.append(sub)
    return found
