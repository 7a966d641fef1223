"""Where a request's caller waits, shared by the instance actor and its hand-off side (kept
apart so that neither imports the other)."""

from __future__ import annotations

import queue
import threading
import time


class Waiter:
    """Where a request's caller waits: an event and the result, plus a token queue if streamed;
    `arrival` is when the request reached this instance (`time.perf_counter()`)."""
    __slots__ = ("event", "slot", "tokens", "arrival")

    def __init__(self, stream: bool):
        self.event, self.slot = threading.Event(), {}
        self.arrival = time.perf_counter()
        self.tokens: queue.Queue | None = queue.Queue() if stream else None

    def done(self, **result) -> None:
        self.slot.update(result)
        self.event.set()
        if self.tokens is not None:
            self.tokens.put(None)


def text_of(seq) -> dict:
    """The output text of a finished request, when the instance detokenizes."""
    return {"text": seq.detok.text} if seq.detok is not None else {}
