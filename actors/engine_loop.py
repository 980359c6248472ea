"""One engine driven by one thread, fed from asyncio: the core both worker actors share.

The engine is not thread-safe, so a single background thread owns it: it applies queued add/abort
commands, runs `step()` while there is work, sleeps on a condition when idle, and hands each step's
outputs to the actor's event loop in one call, which passes each request's to that request's sink.
`EngineFront` is the event-loop half (sinks, ordering, aborts), shared with the engine-core process
(`engine_core`), which runs this same loop in a child process.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from ..engine.outputs import RequestOutput
from ..engine.sampling import SamplingParams
from .core_share import CoreShare
from .output_coalescer import OutputCoalescer

log = logging.getLogger(__name__)

CLOSED_MEMORY = 4096  # finished/aborted request ids remembered per engine


class RequestAborted(Exception):
    """Given to a request's sink when it is aborted, so a consumer still waiting on it wakes up."""


Sink = Callable[[RequestOutput | BaseException], None]  # one request's results, in order


class Mirror(Protocol):
    """The other tensor-parallel ranks of this engine. Each iteration they get the same command
    batch, applied in the same order, and step when this engine steps, so every collective inside
    the model (and the KV import/export agreements) has all ranks present."""

    def apply(self, commands: list[tuple], step: bool) -> None:
        """Forward one iteration without waiting for it; raises if a rank is gone."""


class EngineFront:
    """The event-loop side of an engine: each request's sink, and the commands that reach the engine
    in the order they were made. `submit`/`abort` must be called from the event loop thread that runs
    the sinks (the actor's loop); each request's results come back through its sink, in order,
    called on that loop once per engine step. Subclasses carry the commands to the engine
    (`_command`) and hand each step's results to `_post` from whatever thread gets them."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sinks: dict[str, Sink] = {}
        # Recently aborted or finished ids: an abort can reach the actor before the call that submits
        # the request (Ray does not order an async actor's calls), and must still win.
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._broken: str | None = None  # why the engine cannot step any more, once it cannot
        self._stats = None

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               sink: Sink, **add_kwargs: Any) -> None:
        """Queue a request; `sink` gets its RequestOutputs up to the finished one, or an exception
        that ends it. A request the engine cannot take (it checks the prompt against its context and
        memory) gets a ValueError there."""
        if self._broken is not None:
            raise RuntimeError(self._broken)
        if request_id in self._closed:
            raise RequestAborted(request_id)
        if request_id in self._sinks:
            raise ValueError(f"request id {request_id!r} is already running")
        self._loop = asyncio.get_running_loop()  # the actor's loop (the one that submits last)
        self._sinks[request_id] = sink
        try:
            self._command(("add", request_id, list(prompt_token_ids), params, add_kwargs))
        except BaseException:   # not queued (e.g. it would not pickle for the engine's process)
            del self._sinks[request_id]
            raise

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; a no-op for unknown or finished requests."""
        self._close(request_id)
        sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink(RequestAborted(request_id))
            self._command(("abort", request_id))

    def abort_all(self) -> int:
        """abort() every request; returns how many there were."""
        ids = list(self._sinks)
        for request_id in ids:
            self.abort(request_id)
        return len(ids)

    @property
    def num_requests(self) -> int:
        return len(self._sinks)

    def stats(self):
        """The engine's stats as of its last step (a snapshot: the engine is not touched here)."""
        return self._stats

    def _command(self, cmd: tuple) -> None:
        raise NotImplementedError

    def _close(self, request_id: str) -> None:
        self._closed[request_id] = None
        if len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)

    def _post(self, results: list) -> None:
        """Hand one step's results to the event loop (from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed since the check (actor exiting)
            loop.call_soon_threadsafe(self._deliver, results)

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for request_id, item in items:
            sink = self._sinks.get(request_id)
            if sink is None:
                continue  # aborted meanwhile: nobody is listening
            if isinstance(item, BaseException) or item.finished:
                del self._sinks[request_id]
                self._close(request_id)
            sink(item)

    def _fail(self, reason: str) -> None:
        """The engine is gone for good: every request now and later fails with `reason` (from any
        thread)."""
        self._broken = reason
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._fail_all, reason)

    def _fail_all(self, reason: str) -> None:
        sinks, self._sinks = self._sinks, {}
        for request_id, sink in sinks.items():
            self._close(request_id)
            sink(RuntimeError(reason))


class EngineLoop(EngineFront):
    """Runs `engine` on a daemon thread of this process: it applies queued add/abort commands, runs
    `step()` while there is work, sleeps on a condition when idle, and hands each step's results
    to the event loop in one call (or, with `publish`, to `publish(results, stats)` on the engine
    thread: the engine-core process sends them to its worker that way).

    With a `mirror` (tensor parallel) a failed step is fatal — the ranks' process group is broken —
    and `on_fatal(exc)` is called (the worker exits, so its callers fail over); without one the
    loop fails every request and stops."""

    def __init__(self, engine, name: str = "engine", mirror: Mirror | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 publish: Callable[[list, Any], None] | None = None,
                 cores: CoreShare | None = None, stream_interval: int = 1) -> None:
        """`engine` is the engine, or a callable that builds it. A builder runs on the engine's
        thread, and this returns once it has (raising what it raised), so that every OpenMP parallel
        region of the engine, its construction's included, opens on that one thread: libgomp keeps a
        thread team for each thread that opens one, and with more of its threads than cores it stops
        spinning between regions, so each region then waits on a futex wake-up (measured on 2 cores:
        a batch-1 decode step of 12 ms took 26 once the engine built on one thread stepped on
        another).

        With `cores` the engine's threads are sized before each step to the cores the host's other
        engines leave idle, and given back while it has nothing to do. With `stream_interval` N a
        running request's tokens are handed out N at a time (see `OutputCoalescer`)."""
        super().__init__()
        self.mirror = mirror
        self._cores = cores
        self._on_fatal = on_fatal
        self._publish = publish
        self._coalescer = OutputCoalescer(stream_interval)
        self._cond = threading.Condition()
        self._commands: deque[tuple] = deque()
        self._stopped = False
        self._active: set[str] = set()  # requests inside the engine (engine thread only)
        build = engine if callable(engine) and not hasattr(engine, "step") else (lambda: engine)
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(build, built), name=name, daemon=True)
        self._thread.start()
        built.result()
        self._stats = self.engine.stats()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)
        if self._cores is not None and not self._thread.is_alive():
            self._cores.close()

    def _command(self, cmd: tuple) -> None:
        self.enqueue(cmd)

    def enqueue(self, cmd: tuple) -> None:
        """Queue one command for the engine thread. The engine-core process feeds the commands its
        worker's front made straight in here."""
        with self._cond:
            self._commands.append(cmd)
            self._cond.notify()

    # ------------------------------------------------------------------ engine thread
    def _run(self, build: Callable[[], Any], built: Future) -> None:
        try:
            engine = build()
        except BaseException as exc:
            built.set_exception(exc)
            return
        self.engine = engine
        built.set_result(engine)
        while True:
            with self._cond:
                while not (self._stopped or self._commands or engine.has_unfinished_requests()):
                    if self._cores is not None:
                        self._cores.release()
                    self._cond.wait()
                if self._stopped:
                    return
                commands = list(self._commands)
                self._commands.clear()
            results: list[tuple[str, RequestOutput | BaseException]] = []
            for cmd in commands:
                self._apply(cmd, results)
            step = engine.has_unfinished_requests()
            if self.mirror is not None:
                try:
                    self.mirror.apply(commands, step)
                except Exception as exc:
                    self._fatal(exc)
                    return
            if step:
                if self._cores is not None:
                    self._size_step(engine)
                try:
                    outputs = engine.step()
                except Exception as exc:
                    if self.mirror is not None:  # the ranks' collectives are out of step for good
                        self._fatal(exc)
                        return
                    # a broken step fails its requests, not the worker
                    log.exception("engine step failed; failing %d requests", len(self._active))
                    for request_id in self._active:
                        engine.abort_request(request_id)
                        results.append((request_id, RuntimeError(f"engine step failed: {exc}")))
                    self._active.clear()
                else:
                    for out in outputs:
                        if out.finished:
                            self._active.discard(out.request_id)
                        results.append((out.request_id, out))
            self._stats = engine.stats()
            results = self._coalescer.feed(results)
            if self._publish is not None:
                self._publish(results, self._stats)
            elif results:
                self._post(results)

    def _size_step(self, engine) -> None:
        """Step on the threads the host's core board leaves this engine; if that fails, on its
        share from now on."""
        try:
            engine.set_threads(self._cores.claim(engine.decode_batch()))
        except Exception:
            log.exception("sizing the engine's threads failed: it keeps its share from now on")
            cores, self._cores = self._cores, None
            with contextlib.suppress(Exception):
                engine.set_threads(cores.share)
                cores.close()

    def _fatal(self, exc: BaseException) -> None:
        """Lockstep with the other TP ranks is lost (a rank died, or a collective timed out)."""
        log.error("tensor-parallel ranks out of step (%s: %s): the engine stops",
                  type(exc).__name__, exc)
        if self._on_fatal is not None:
            # the worker ends itself: its callers see it die and fail over, rather than
            # getting these requests' errors first
            self._broken = f"tensor-parallel engine failed: {exc}"
            self._on_fatal(exc)
            return
        self._fail(f"tensor-parallel engine failed: {exc}")

    def _apply(self, cmd: tuple, results: list) -> None:
        if cmd[0] == "add":
            _, request_id, ids, params, kwargs = cmd
            try:
                self.engine.add_request(request_id, prompt_token_ids=ids, params=params, **kwargs)
            except ValueError as exc:  # the request does not fit this engine: the client's 400
                results.append((request_id, exc))
            except Exception as exc:  # a bug: fail this request, keep the engine thread alive
                log.exception("add_request(%s) failed", request_id)
                results.append((request_id, RuntimeError(f"could not add the request: {exc}")))
            else:
                self._active.add(request_id)
        else:
            self.engine.abort_request(cmd[1])
            self._active.discard(cmd[1])
            self._coalescer.drop(cmd[1])
