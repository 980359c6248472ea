"""KV transfers off the step thread: a request's blocks are read from or written to the store on a
transfer thread while the running batch keeps stepping; the step thread only picks up finished jobs."""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from .distributed import min_each_over_ranks
from .kv_connector import mark_transfer_thread
from .kv_io import KVExchange, KVLoad, KVSave


@dataclass(eq=False)
class Transfer:
    job: KVLoad | KVSave
    future: Future
    started: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # its request is gone: free its blocks once the bytes stop moving


class KVTransfers:
    """Jobs run one at a time, in order, on one thread (the store client is the bottleneck, and one
    thread keeps the step's cores free). With tensor parallelism every rank submits the same jobs in
    the same order, and a job counts as finished only when it has finished on every rank: the ranks
    agree in `collect`, on the step thread, so no collective ever runs on the transfer thread."""

    def __init__(self, kv: KVExchange) -> None:
        self.kv = kv
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-transfer",
                                        initializer=mark_transfer_thread)
        self._pending: list[Transfer] = []

    def submit(self, job: KVLoad | KVSave) -> Transfer:
        t = Transfer(job, self._pool.submit(self.kv.transfer, job))
        self._pending.append(t)
        return t

    def of(self, seq) -> Transfer | None:
        return next((t for t in self._pending if t.job.seq is seq), None)

    def pending(self) -> bool:
        """Whether a load or save is in flight."""
        return bool(self._pending)

    def wait(self, timeout_s: float) -> None:
        """Block until a pending job finishes (or `timeout_s`): what an idle step does instead of
        spinning while only transfers are in flight."""
        if self._pending:
            wait([t.future for t in self._pending], timeout=timeout_s, return_when=FIRST_COMPLETED)

    def settle_saves(self, timeout_s: float) -> None:
        """Block until every pending save has finished here (or `timeout_s`)."""
        saves = [t.future for t in self._pending if isinstance(t.job, KVSave)]
        if saves and timeout_s > 0:
            wait(saves, timeout=timeout_s)

    def saving(self) -> bool:
        """Whether a save is pending (the same answer on every rank: they submit alike)."""
        return any(isinstance(t.job, KVSave) for t in self._pending)

    def collect(self) -> list[Transfer]:
        """The jobs finished on every rank, in submission order; they leave the pending list."""
        if not self._pending:
            return []
        done = min_each_over_ranks([int(t.future.done()) for t in self._pending],
                                   self.kv.cache.device)
        finished = [t for t, d in zip(self._pending, done) if d]
        self._pending = [t for t, d in zip(self._pending, done) if not d]
        return finished

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
