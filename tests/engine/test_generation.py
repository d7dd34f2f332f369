"""The mailbox that carries a driver thread's events to the event loop."""

from __future__ import annotations

import asyncio
import os
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
        for i in range(2000):  # more wake-ups than the pipe holds unread
            mailbox.post([(receiver, [i])])  # type: ignore[list-item]

    try:
        threads = [threading.Thread(target=driver, args=(r,)) for r in receivers]
        for thread in threads:
            thread.start()
        for thread in threads:
            await asyncio.to_thread(thread.join)
        for _ in range(100):
            if all(len(r.received) == 2000 for r in receivers):
                break
            await asyncio.sleep(0.01)
        for receiver in receivers:
            assert receiver.received == list(range(2000))
            assert receiver.threads == {threading.current_thread().name}  # the loop's
    finally:
        mailbox.close()


async def test_a_closed_mailbox_refuses_posts_and_its_requests_are_cancelled() -> None:
    mailbox = Mailbox(asyncio.get_running_loop())
    fds = (mailbox._wake_r, mailbox._wake_w)
    mailbox.close()
    mailbox.close()  # twice: nothing more happens
    for fd in fds:  # no descriptor left open
        with pytest.raises(OSError):
            os.fstat(fd)
    with pytest.raises(RuntimeError, match="closed"):
        mailbox.post([])

    class Stub(Receiver):
        def __init__(self) -> None:
            super().__init__()
            self.mailbox = mailbox

        def take_events(self) -> list[Any]:
            return ["event"]

    generation = Stub()
    deliver([generation])  # type: ignore[list-item]
    assert generation.cancelled and not generation.received
