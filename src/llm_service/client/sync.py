"""``Client``: the blocking face of ``AsyncClient``, which runs on a private event-loop thread.

Every method hands the same coroutine ``AsyncClient`` runs to that loop and waits for it, so the
two clients share one implementation (TLS, retries, error mapping, cancellation).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar, Unpack

from llm_service.client.aio import AsyncClient, AsyncStream, options_from
from llm_service.client.types import (
    Chunk,
    ClientOptions,
    Completion,
    Embeddings,
    Message,
    ModelInfo,
    Sampling,
    ServerStatus,
    Started,
    Tools,
)
from llm_service.settings import DEFAULT_TARGET, ClientSettings

__all__ = ["Client", "Stream"]

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread, for coroutines submitted from other threads."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="llm-client-loop", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it; Ctrl-C (or any exception) cancels it."""
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop, after the tasks still on it (gRPC's own among them) have ended."""
        if self.loop.is_closed():
            return
        self.run(_cancel_pending())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Client:
    """A blocking client of one llm_service: the same arguments and behaviour as ``AsyncClient``.

    Example:
        >>> from llm_service.client import Client
        >>> with Client.from_settings() as client:  # doctest: +SKIP
        ...     for chunk in client.stream("The capital of France is", max_tokens=16):
        ...         print(chunk.text, end="", flush=True)
        ...     print(client.generate([("user", "Hi!")], temperature=0).text)
        ...     print(client.status().pool)
    """

    def __init__(self, target: str = DEFAULT_TARGET, **options: Unpack[ClientOptions]) -> None:
        self._async = AsyncClient(target, **options)  # checks the options; no loop needed yet
        self._thread = _LoopThread()

    @classmethod
    def from_settings(cls, settings: ClientSettings | None = None) -> Client:
        """A client configured from ``settings`` (default: from the ``LLM_*`` environment)."""
        s = settings if settings is not None else ClientSettings.model_validate({})
        return cls(s.target, **options_from(s))

    @property
    def target(self) -> str:
        return self._async.target

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection and stop the client's thread."""
        if not self._thread.loop.is_closed():
            self._thread.run(self._async.close())
            self._thread.stop()

    def stream(
        self,
        prompt: str | Sequence[Message],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        tools: Tools | None = None,
        split_reasoning: bool = True,
        **sampling: Unpack[Sampling],
    ) -> Stream:
        """Stream a completion: an iterator of ``Chunk``s (see ``AsyncClient.stream``).

        Leaving the loop early (``break``, ``close()``, Ctrl-C, garbage collection) cancels
        generation on the server.
        """
        inner = self._async.stream(
            prompt,
            timeout=timeout,
            request_id=request_id,
            tools=tools,
            split_reasoning=split_reasoning,
            **sampling,
        )
        return Stream(self._thread, inner)

    def generate(
        self,
        prompt: str | Sequence[Message],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        tools: Tools | None = None,
        split_reasoning: bool = True,
        **sampling: Unpack[Sampling],
    ) -> Completion:
        """Generate a completion and return it whole (see ``AsyncClient.stream``)."""
        return self._thread.run(
            self._async.generate(
                prompt,
                timeout=timeout,
                request_id=request_id,
                tools=tools,
                split_reasoning=split_reasoning,
                **sampling,
            )
        )

    def tokenize(
        self,
        text: str,
        *,
        add_special: bool = True,
        parse_special: bool = False,
        timeout: float | None = None,
    ) -> list[int]:
        return self._thread.run(
            self._async.tokenize(
                text, add_special=add_special, parse_special=parse_special, timeout=timeout
            )
        )

    def detokenize(self, tokens: Sequence[int], *, timeout: float | None = None) -> str:
        return self._thread.run(self._async.detokenize(tokens, timeout=timeout))

    def apply_chat_template(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> tuple[str, int]:
        return self._thread.run(self._async.apply_chat_template(messages, timeout=timeout))

    def embed(
        self,
        inputs: Sequence[str] | Sequence[Sequence[int]],
        *,
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Embeddings:
        """A unit vector per input, in order (see ``AsyncClient.embed``)."""
        return self._thread.run(self._async.embed(inputs, timeout=timeout, request_id=request_id))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return self._thread.run(self._async.model_info(timeout=timeout))

    def status(self, *, timeout: float | None = None) -> ServerStatus:
        return self._thread.run(self._async.status(timeout=timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        return self._thread.run(self._async.health(service, timeout=timeout))


class Stream:
    """The chunks of one Generate call, as a blocking iterator (see ``AsyncStream``)."""

    def __init__(self, thread: _LoopThread, inner: AsyncStream) -> None:
        self._thread = thread
        self._inner = inner

    @property
    def request_id(self) -> str:
        return self._inner.request_id

    @property
    def started(self) -> Started | None:
        return self._inner.started

    @property
    def completion(self) -> Completion | None:
        return self._inner.completion

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        try:
            return self._thread.run(self._inner.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading; if the stream is not finished, cancel generation on the server."""
        self._inner.cancel()

    def __del__(self) -> None:
        self.close()


async def _cancel_pending() -> None:
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
