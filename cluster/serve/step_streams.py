"""One ingress replica's decode requests: started on their workers, their outputs read back over one
stream per worker (each message: one or more engine steps' outputs of all this replica's requests
there) and handed to each request's queue.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from . import detached

log = logging.getLogger(__name__)


class WorkerLost(Exception):
    """A worker actor died or cannot be reached."""


class StepStreams:
    """The decode output streams of ingress replica `owner`. A request's queue gets lists of entries,
    in order: RequestOutputs, or an exception that ends it (the worker's error for it, or
    `WorkerLost` when its worker died or its stream broke)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._queues: dict[str, dict[str, asyncio.Queue]] = {}  # worker -> request -> its queue
        self._readers: dict[str, asyncio.Task] = {}  # worker -> the task reading its stream

    def start(self, worker_id: str, handle: Any, request_id: str, *args: Any) -> asyncio.Queue:
        """Start `request_id` on the worker (`DecodeWorker.start(owner, request_id, *args)`); its
        entries arrive in the returned queue until `stop`."""
        queue: asyncio.Queue = asyncio.Queue()
        # Listening before the request starts: its first outputs may come before start() returns.
        self._queues.setdefault(worker_id, {})[request_id] = queue
        if worker_id not in self._readers:  # it outlives this request, and its cancellation
            self._readers[worker_id] = detached.task(self._read(worker_id, handle))
        call = handle.start.remote(self.owner, request_id, *args)
        asyncio.ensure_future(call).add_done_callback(
            lambda started: self._started(worker_id, request_id, queue, started))
        return queue

    def stop(self, worker_id: str, request_id: str) -> None:
        """Stop listening for `request_id` on the worker (it does not abort it there)."""
        self._queues.get(worker_id, {}).pop(request_id, None)

    def _started(self, worker_id: str, request_id: str, queue: asyncio.Queue,
                 started: asyncio.Future) -> None:
        """start() tells a request's own errors on the stream; failing itself, the call lost the
        worker (it died before the call ran), unless Ray cancelled it with its request."""
        exc = None if started.cancelled() else started.exception()
        if exc is None or cancelled_with_request(exc):
            return
        if self._queues.get(worker_id, {}).get(request_id) is queue:
            log.error("starting %s on %s failed: %s: %s", request_id, worker_id, type(exc).__name__, exc)
            queue.put_nowait([WorkerLost(worker_id)])

    async def _read(self, worker_id: str, handle: Any) -> None:
        """Hand each message's entries to their requests; reopen a stream that ends; on a broken one
        every request on the worker hears it and this reader ends (the next start opens another).
        A request that still runs there though it ended here is aborted there again: should the
        abort its end sent be lost, nothing else would free its blocks before it finished."""
        try:
            while True:
                async for ref in handle.outputs.remote(self.owner):
                    batch = await ref
                    queues = self._queues.get(worker_id, {})
                    for request_id, entries in batch.items():
                        queue = queues.get(request_id)
                        if queue is not None:
                            queue.put_nowait(entries)
                        elif not _final(entries[-1]):
                            # It ended here (its client left, it failed over) and runs on there: a
                            # step under way as it ended, or its abort was lost. Aborting one that
                            # has ended there too is a no-op.
                            log.debug("%s still runs on %s: aborting it", request_id, worker_id)
                            detached.call(handle.abort.remote, request_id)
        except ray.exceptions.RayError as exc:
            log.error("output stream of %s lost: %s: %s", worker_id, type(exc).__name__, exc)
            for queue in self._queues.pop(worker_id, {}).values():
                queue.put_nowait([WorkerLost(worker_id)])
        finally:
            del self._readers[worker_id]


def cancelled_with_request(exc: BaseException) -> bool:
    """A call Ray cancelled because the request that made it was cancelled (its client left)."""
    return isinstance(getattr(exc, "cause", None) or exc, ray.exceptions.TaskCancelledError)


def _final(entry: Any) -> bool:
    """A request's last entry from its worker: its finished output, or the error that ended it."""
    return isinstance(entry, BaseException) or bool(getattr(entry, "finished", False))
