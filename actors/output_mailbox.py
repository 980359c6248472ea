"""What one ingress replica has not yet read of its requests' outputs on one decode worker.

The engine loop puts each request's results in its owner's mailbox (on the actor's event loop, once
per engine step); the owner's output stream takes everything pending as one message.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ..engine.outputs import RequestOutput

Entry = RequestOutput | BaseException
Batch = dict[str, list[Entry]]  # request id -> its entries since the last take, in order


class OutputMailbox:
    """One owner's pending entries. A single reader takes them (`take`); a newer reader supersedes
    an older one, which then ends. Entries wait for a reader, so one that attaches late misses
    nothing."""

    def __init__(self) -> None:
        self.requests: set[str] = set()  # submitted here and not ended yet
        self.unread_since: float | None = None  # when the oldest pending entry arrived
        self.closed = False
        self._pending: Batch = {}
        self._ready = asyncio.Event()
        self._reader = 0

    def sink(self, request_id: str) -> Callable[[Entry], None]:
        """Where `request_id`'s results go (an EngineLoop sink)."""
        self.requests.add(request_id)
        return lambda entry: self.put(request_id, entry)

    def put(self, request_id: str, entry: Entry) -> None:
        if not self._pending:
            self.unread_since = time.monotonic()
        self._pending.setdefault(request_id, []).append(entry)
        if isinstance(entry, BaseException) or entry.finished:
            self.requests.discard(request_id)
        self._ready.set()

    def attach(self) -> int:
        """Become the reader; returns the token `take` wants."""
        self._reader += 1
        self._ready.set()  # wake the reader this one supersedes
        return self._reader

    async def take(self, reader: int) -> Batch | None:
        """Everything pending, once there is something; None once `reader` is superseded, or the
        mailbox is closed and emptied."""
        while True:
            if reader != self._reader:
                return None
            if self._pending:
                batch, self._pending = self._pending, {}
                self.unread_since = None
                self._ready.clear()
                return batch
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        """No more entries: the reader gets what is pending, then ends."""
        self.closed = True
        self._ready.set()
