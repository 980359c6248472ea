"""The engine thread driver with a scripted engine: outputs reach the right request's queue, aborts
free the request and wake its consumer (even when they arrive first), errors are delivered, and an
idle loop does not spin; a TP mirror sees every iteration, and losing it is fatal."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from pdcluster.actors.engine_loop import EngineLoop, RequestAborted
from pdcluster.actors.tp_followers import apply_command
from pdcluster.engine.outputs import RequestOutput
from pdcluster.engine.sampling import SamplingParams


@dataclass(frozen=True)
class _Stats:
    num_running: int
    num_free_blocks: int


class FakeEngine:
    """Each request emits one token per step until it has max_tokens of them."""

    def __init__(self, fail_step: bool = False) -> None:
        self.seqs: dict[str, list] = {}
        self.steps = 0
        self.aborted: list[str] = []
        self.fail_step = fail_step
        self.thread: threading.Thread | None = None

    def add_request(self, request_id, prompt_token_ids, params):
        self.thread = threading.current_thread()
        if prompt_token_ids == [666]:
            raise ValueError("refused by the engine")
        if prompt_token_ids == [667]:
            raise KeyError("a bug in the engine")
        self.seqs[request_id] = [params.max_tokens, 0]

    def abort_request(self, request_id):
        self.aborted.append(request_id)
        return self.seqs.pop(request_id, None) is not None

    def has_unfinished_requests(self):
        return bool(self.seqs)

    def step(self):
        self.steps += 1
        if self.fail_step:
            raise RuntimeError("boom")
        time.sleep(0.002)
        outs = []
        for rid, seq in list(self.seqs.items()):
            seq[1] += 1
            done = seq[1] >= seq[0]
            outs.append(RequestOutput(rid, [seq[1]], f"t{seq[1]} ", done, "length" if done else None,
                                      3, seq[1], 0))
            if done:
                del self.seqs[rid]
        return outs

    def stats(self):
        return _Stats(len(self.seqs), 100 - len(self.seqs))


def test_a_builder_runs_on_the_thread_that_steps_and_its_failure_reaches_the_caller():
    # every OpenMP region of a real engine, its construction's included, must open on one thread
    built_on = []

    def build():
        built_on.append(threading.current_thread())
        return FakeEngine()

    loop = EngineLoop(build)
    assert built_on == [loop._thread] and loop.engine.thread is None

    async def run():
        return await _drain(_submit(loop, "a", [1], SamplingParams(max_tokens=2)))

    assert [o.new_token_ids for o in asyncio.run(run())] == [[1], [2]]
    assert loop.engine.thread is built_on[0]
    loop.stop()

    def broken():
        raise MemoryError("no room for the KV cache")

    with pytest.raises(MemoryError, match="no room"):
        EngineLoop(broken, name="broken-engine")
    for t in threading.enumerate():  # the thread ends: nothing steps a half-built engine
        if t.name == "broken-engine":
            t.join(5)
            assert not t.is_alive()


def _submit(loop: EngineLoop, request_id: str, prompt: list[int], params: SamplingParams) -> asyncio.Queue:
    """Submit a request whose results land in a queue (the prefill worker's way)."""
    queue: asyncio.Queue = asyncio.Queue()
    loop.submit(request_id, prompt, params, queue.put_nowait)
    return queue


async def _drain(queue: asyncio.Queue) -> list:
    items = []
    while True:
        item = await asyncio.wait_for(queue.get(), 5)
        items.append(item)
        if isinstance(item, BaseException) or item.finished:
            return items


def test_requests_stream_their_own_outputs_and_finish():
    engine = FakeEngine()
    loop = EngineLoop(engine)

    async def run():
        qa = _submit(loop, "a", [1, 2, 3], SamplingParams(max_tokens=3))
        qb = _submit(loop, "b", [4, 5], SamplingParams(max_tokens=5))
        a, b = await asyncio.gather(_drain(qa), _drain(qb))
        return a, b

    a, b = asyncio.run(run())
    assert [o.new_token_ids for o in a] == [[1], [2], [3]] and a[-1].finish_reason == "length"
    assert [o.new_token_ids for o in b] == [[i] for i in range(1, 6)]
    assert loop.num_requests == 0
    assert engine.thread is not threading.main_thread()  # the engine runs on the loop's own thread
    loop.stop()


def test_abort_wakes_the_consumer_and_frees_the_request():
    engine = FakeEngine()
    loop = EngineLoop(engine)

    async def run():
        q = _submit(loop, "long", [1], SamplingParams(max_tokens=10_000))
        first = await q.get()
        loop.abort("long")
        rest = await _drain(q)
        return first, rest

    first, rest = asyncio.run(run())
    assert first.new_token_ids == [1]
    assert isinstance(rest[-1], RequestAborted)
    deadline = time.monotonic() + 2
    while "long" in engine.seqs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "long" in engine.aborted and not engine.seqs
    loop.stop()


def test_an_abort_that_arrives_first_wins():
    loop = EngineLoop(FakeEngine())

    async def run():
        loop.abort("early")
        with pytest.raises(RequestAborted):
            _submit(loop, "early", [1], SamplingParams(max_tokens=4))

    asyncio.run(run())
    loop.stop()


def test_errors_reach_the_request():
    loop = EngineLoop(FakeEngine())

    async def run():
        # the engine checks the request on its own thread and the refusal reaches the queue
        refused = await _drain(_submit(loop, "bad", [666], SamplingParams()))
        # any other failure to add fails that request only: the engine thread keeps serving
        buggy = await _drain(_submit(loop, "buggy", [667], SamplingParams()))
        return refused, buggy, await _drain_one(loop)

    (err,), (bug,), served = asyncio.run(run())
    assert isinstance(err, ValueError) and "refused" in str(err)
    assert isinstance(bug, RuntimeError) and "a bug" in str(bug)
    assert served[-1].finished
    loop.stop()

    failing = EngineLoop(FakeEngine(fail_step=True))
    (err,) = asyncio.run(_drain_one(failing))
    assert isinstance(err, RuntimeError) and "boom" in str(err)
    failing.stop()


async def _drain_one(loop: EngineLoop) -> list:
    return await _drain(_submit(loop, "x", [1], SamplingParams(max_tokens=3)))


def test_idle_loop_sleeps():
    engine = FakeEngine()
    loop = EngineLoop(engine)
    asyncio.run(_drain_one(loop))
    steps = engine.steps
    time.sleep(0.3)
    assert engine.steps == steps  # no work, no steps: the thread waits on its condition
    loop.stop()


class ReplayMirror:
    """A follower rank in miniature: replays every forwarded iteration on an engine of its own."""

    def __init__(self, fail: bool = False) -> None:
        self.engine = FakeEngine()
        self.fail = fail

    def apply(self, commands, step):
        if self.fail:
            raise BrokenPipeError("follower gone")
        for cmd in commands:
            apply_command(self.engine, cmd)
        if step:
            self.engine.step()


def test_a_mirror_gets_every_command_and_step_so_its_engine_stays_in_step():
    engine, mirror = FakeEngine(), ReplayMirror()
    loop = EngineLoop(engine, mirror=mirror)

    async def run():
        done = _submit(loop, "a", [1], SamplingParams(max_tokens=3))
        refused = _submit(loop, "bad", [666], SamplingParams())
        long = _submit(loop, "long", [1], SamplingParams(max_tokens=10**6))
        await _drain(done), await _drain(refused)
        loop.abort("long")
        while not isinstance(await long.get(), RequestAborted):
            pass

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while engine.seqs and time.monotonic() < deadline:  # the abort reaches the engine thread
        time.sleep(0.01)
    loop.stop()
    assert not engine.seqs and not mirror.engine.seqs
    assert mirror.engine.steps == engine.steps and mirror.engine.aborted == engine.aborted


def test_a_lost_rank_is_fatal():
    fatal: list[BaseException] = []
    loop = EngineLoop(FakeEngine(), mirror=ReplayMirror(fail=True), on_fatal=fatal.append)

    async def run():
        _submit(loop, "x", [1], SamplingParams(max_tokens=3))
        for _ in range(500):
            if fatal:
                return
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert isinstance(fatal[0], BrokenPipeError)  # the worker ends itself from here
    loop.stop()

    # without on_fatal every request fails and nothing new is taken
    broken = EngineLoop(FakeEngine(fail_step=True), mirror=ReplayMirror())
    (err,) = asyncio.run(_drain_one(broken))
    assert isinstance(err, RuntimeError) and "tensor-parallel" in str(err)
    with pytest.raises(RuntimeError):
        asyncio.run(_drain_one(broken))
    broken.stop()


def test_a_stream_interval_sends_tokens_in_runs_and_an_abort_drops_what_was_held():
    engine = FakeEngine()
    loop = EngineLoop(engine, stream_interval=4)

    async def run():
        q = _submit(loop, "a", [1], SamplingParams(max_tokens=10))
        long = _submit(loop, "long", [1], SamplingParams(max_tokens=10_000))
        a = await _drain(q)
        first = await long.get()
        loop.abort("long")
        return a, first, await _drain(long)

    a, first, rest = asyncio.run(run())
    # the first token at once, then runs of 4, then the rest with the last
    assert [o.new_token_ids for o in a] == [[1], [2, 3, 4, 5], [6, 7, 8, 9], [10]]
    assert "".join(o.delta_text for o in a) == "".join(f"t{i} " for i in range(1, 11))
    assert first.new_token_ids == [1] and isinstance(rest[-1], RequestAborted)
    deadline = time.monotonic() + 2
    while loop._coalescer.num_held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop._coalescer.num_held == 0
    loop.stop()
