"""The mailbox that carries a driver thread's events to the event loop."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from llm_service.engine.generation import Mailbox, deliver


class Receiver:
    """Stands for a Generation: what the loop hands it, and on which thread."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.threads: set[str] = set()
        self.cancelled = False

    def _receive(self, events: list[Any]) -> None:
        self.received.extend(events)
        self.threads.add(threading.current_thread().name)

    def cancel(self) -> None:
        self.cancelled = True


async def test_posts_from_threads_reach_the_loop_in_order() -> None:
    loop = asyncio.get_running_loop()
    mailbox = Mailbox(loop)
    receivers = [Receiver() for _ in range(3)]

    def driver(receiver: Receiver) -> None:
        for i in range(30_000):
            mailbox.post([(receiver, [i])])  # type: ignore[list-item]

    try:
        threads = [threading.Thread(target=driver, args=(r,)) for r in receivers]
        for thread in threads:
            thread.start()
        for thread in threads:  # the loop blocked: 90,000 wake-ups, more than the pipe holds
            thread.join()
        assert not any(r.received for r in receivers)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if all(len(r.received) == 30_000 for r in receivers):
                break
        for receiver in receivers:
            assert receiver.received == list(range(30_000))
            assert receiver.threads == {threading.current_thread().name}  # the loop's
    finally:
        mailbox.close()


async def test_closing_hands_over_what_is_waiting_then_refuses_posts() -> None:
    mailbox = Mailbox(asyncio.get_running_loop())
    waiting = Receiver()
    mailbox.post([(waiting, ["last"])])  # type: ignore[list-item]
    mailbox.close()
    assert waiting.received == ["last"]
    mailbox.close()  # twice: nothing more happens
    with pytest.raises(RuntimeError, match="closed"):
        mailbox.post([])
    generation = Stub(mailbox)
    deliver([generation])  # type: ignore[list-item]
    assert generation.cancelled and not generation.received


def test_a_mailbox_whose_loop_is_closed_refuses_posts() -> None:
    """(An engine never closed, its loop closed by asyncio.run: its requests are cancelled
    instead of decoding on for nobody.)"""
    loop = asyncio.new_event_loop()
    mailbox = Mailbox(loop)
    loop.close()
    generation = Stub(mailbox)
    deliver([generation])  # type: ignore[list-item]
    assert generation.cancelled and not generation.received
    mailbox.close()


class Stub(Receiver):
    """A generation with an event to deliver."""

    def __init__(self, mailbox: Mailbox) -> None:
        super().__init__()
        self.mailbox = mailbox

    def take_events(self) -> list[Any]:
        return ["event"]
