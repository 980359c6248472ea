"""Decode outputs per engine step per ingress replica, with a scripted engine and no Ray: one message
carries a step's outputs of all of an owner's requests, owners never see each other's, a stream that
opens late gets what came before, an aborted request's entries stop, and a worker lost under its
stream moves every request on it to another worker, which finishes them; a request that ended at
the ingress but runs on at its worker is aborted there."""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import ray
from pdcluster.actors.decode_worker import DecodeWorker, HandoffRefused
from pdcluster.actors.engine_loop import EngineLoop, RequestAborted
from pdcluster.actors.router import Admission
from pdcluster.cluster.serve.metrics import ServingMetrics
from pdcluster.cluster.serve.orchestrator import Orchestrator, RequestRecord
from pdcluster.cluster.serve.step_streams import StepStreams, WorkerLost
from pdcluster.engine.sampling import SamplingParams
from test_engine_loop import FakeEngine


class GatedEngine(FakeEngine):
    """Takes a decode worker's request arguments; with `gated`, each step waits for a permit."""

    def __init__(self, gated: bool = False) -> None:
        super().__init__()
        self.gate = threading.Semaphore(0) if gated else None

    def add_request(self, request_id, prompt_token_ids, params, **_decode_kwargs):
        super().add_request(request_id, prompt_token_ids, params)

    def step(self):
        if self.gate is not None:
            self.gate.acquire()
        return super().step()


def _worker(engine: FakeEngine) -> DecodeWorker:
    worker = DecodeWorker.__new__(DecodeWorker)  # the actor without Ray or a model
    worker.loop = EngineLoop(engine)
    worker.mailboxes = {}
    return worker


def _start(worker: DecodeWorker, owner: str, request_id: str, max_tokens: int, prompt=(1, 2)):
    return worker.start(owner, request_id, SamplingParams(max_tokens=max_tokens), None, prompt)


async def _next(stream) -> dict:
    return await asyncio.wait_for(anext(stream), 5)


def _ended(entries: list) -> bool:
    return isinstance(entries[-1], BaseException) or entries[-1].finished


async def _read_until_ended(stream, request_ids: set[str]) -> list[dict]:
    messages = []
    while request_ids:
        messages.append(await _next(stream))
        request_ids -= {r for r, entries in messages[-1].items() if _ended(entries)}
    return messages


def test_one_message_per_step_holds_every_request_of_the_owner():
    engine = GatedEngine(gated=True)
    worker = _worker(engine)

    async def run():
        await _start(worker, "ingress-a", "r1", 4)
        await _start(worker, "ingress-a", "r2", 4)
        stream = worker.outputs("ingress-a")
        messages = []
        for _ in range(2):  # one step at a time: one message each
            engine.gate.release()
            messages.append(await _next(stream))
        engine.gate.release(2)  # two steps the reader does not take in between: one message
        while len(worker.mailboxes["ingress-a"]._pending.get("r1", [])) < 2:
            await asyncio.sleep(0.01)
        merged = await _next(stream)
        engine.gate.release(10)
        rest = await _read_until_ended(stream, {"r2"} - {r for r, e in merged.items() if _ended(e)})
        return messages, merged, rest

    messages, merged, rest = asyncio.run(run())
    for message in messages:
        assert all(len(entries) == 1 for entries in message.values()), messages
    assert set(messages[1]) == {"r1", "r2"}, messages  # both requests' outputs of a step in one message
    assert len(merged["r1"]) == 2, merged
    outputs = [o for m in [*messages, merged, *rest] for o in m.get("r2", [])]
    assert [o.new_token_ids for o in outputs] == [[1], [2], [3], [4]]
    assert outputs[-1].finish_reason == "length"
    worker.loop.stop()


def test_owners_never_see_each_others_requests():
    worker = _worker(GatedEngine())

    async def run():
        await _start(worker, "ingress-a", "a1", 4)
        await _start(worker, "ingress-b", "b1", 2)
        await _start(worker, "ingress-a", "a2", 3)
        return await asyncio.gather(_read_until_ended(worker.outputs("ingress-a"), {"a1", "a2"}),
                                    _read_until_ended(worker.outputs("ingress-b"), {"b1"}))

    seen_a, seen_b = asyncio.run(run())
    assert set().union(*seen_a) == {"a1", "a2"} and set().union(*seen_b) == {"b1"}
    worker.loop.stop()


def test_a_stream_opened_late_gets_the_earlier_outputs_in_order():
    engine = GatedEngine()
    worker = _worker(engine)

    async def run():
        await _start(worker, "ingress-a", "r", 3)
        while engine.seqs or engine.steps < 3:  # all produced before anyone reads
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return await _next(worker.outputs("ingress-a"))

    message = asyncio.run(run())
    assert [o.new_token_ids for o in message["r"]] == [[1], [2], [3]]
    assert message["r"][-1].finished
    worker.loop.stop()


def test_an_aborted_request_ends_with_aborted_and_its_entries_stop():
    worker = _worker(GatedEngine())

    async def run():
        await _start(worker, "ingress-a", "long", 10**6)
        stream = worker.outputs("ingress-a")
        await _next(stream)
        worker.abort("long")
        messages = await _read_until_ended(stream, {"long"})
        await _start(worker, "ingress-a", "short", 4)
        return messages, await _read_until_ended(stream, {"short"})

    messages, after = asyncio.run(run())
    assert isinstance(messages[-1]["long"][-1], RequestAborted)
    assert all("long" not in m for m in after)
    worker.loop.stop()


def test_a_requests_own_errors_come_on_the_stream():
    worker = _worker(GatedEngine())

    async def run():
        await _start(worker, "ingress-a", "refused", 3, prompt=[666])  # the engine refuses it
        await worker.start("ingress-a", "bad-handoff", SamplingParams(), b"not a handoff")
        return await _read_until_ended(worker.outputs("ingress-a"), {"refused", "bad-handoff"})

    messages = asyncio.run(run())
    entries = {r: e for m in messages for r, e in m.items()}
    assert isinstance(entries["refused"][-1], ValueError)
    assert isinstance(entries["bad-handoff"][-1], HandoffRefused)
    worker.loop.stop()


# ---------------------------------------------------------------- the ingress side, Ray faked

class _Ref:
    """An ObjectRef stand-in around a coroutine's result."""

    def __init__(self, coro) -> None:
        self._task = asyncio.ensure_future(coro)

    def __await__(self):
        return self._task.__await__()


class FakeHandle:
    """A decode worker's actor handle; `kill()` makes its stream and calls fail as a dead actor's."""

    def __init__(self, worker: DecodeWorker) -> None:
        self.worker, self.dead = worker, asyncio.Event()
        self.start = SimpleNamespace(remote=lambda *args: _Ref(self._call(worker.start, *args)))
        self.abort = SimpleNamespace(remote=lambda *args: _Ref(self._call(worker.abort, *args)))
        self.outputs = SimpleNamespace(remote=self._outputs)

    async def _call(self, method, *args):
        if self.dead.is_set():
            raise ray.exceptions.ActorDiedError()
        result = method(*args)
        return await result if asyncio.iscoroutine(result) else result

    async def _outputs(self, owner: str):
        stream = self.worker.outputs(owner)
        while True:
            nxt = asyncio.ensure_future(anext(stream))
            dead = asyncio.ensure_future(self.dead.wait())
            await asyncio.wait({nxt, dead}, return_when=asyncio.FIRST_COMPLETED)
            if self.dead.is_set():
                nxt.cancel()
                raise ray.exceptions.ActorDiedError()
            dead.cancel()
            yield _Ref(asyncio.sleep(0, nxt.result()))

    def kill(self) -> None:
        self.dead.set()


def test_the_fan_out_hands_each_request_its_entries_and_a_lost_worker_to_all():
    worker = _worker(GatedEngine(gated=True))

    async def run():
        handle, streams = FakeHandle(worker), StepStreams("ingress-a")
        q1 = streams.start("d0", handle, "r1", SamplingParams(max_tokens=100), None, [1])
        q2 = streams.start("d0", handle, "r2", SamplingParams(max_tokens=100), None, [1])
        worker.loop.engine.gate.release()
        firsts = [await asyncio.wait_for(q.get(), 5) for q in (q1, q2)]
        handle.kill()
        lost = [await asyncio.wait_for(q.get(), 5) for q in (q1, q2)]
        worker.loop.engine.gate.release(10)
        return firsts, lost

    firsts, lost = asyncio.run(run())
    assert [o.new_token_ids for entries in firsts for o in entries] == [[1], [1]]
    assert all(isinstance(entries[-1], WorkerLost) for entries in lost)
    worker.loop.stop()


class FakeRouter:
    def __init__(self) -> None:
        self.rerouted: list[tuple[str, str]] = []
        self.released: list[str] = []
        self.admit = SimpleNamespace(remote=lambda rid, *a: _Ref(self._admit(rid)))
        self.reroute = SimpleNamespace(remote=lambda rid, failed: _Ref(self._reroute(rid, failed)))
        self.release = SimpleNamespace(remote=self.released.append)
        self.prefill_done = SimpleNamespace(remote=lambda rid: None)

    async def _admit(self, request_id: str) -> Admission:
        return Admission(request_id, True, None, "d0")

    async def _reroute(self, request_id: str, failed: str) -> str:
        self.rerouted.append((request_id, failed))
        return "d1"


def test_a_worker_lost_under_its_stream_moves_every_request_on_it_elsewhere():
    d0, d1 = _worker(GatedEngine(gated=True)), _worker(GatedEngine())
    router = FakeRouter()

    async def run():
        handles = {"d0": FakeHandle(d0), "d1": FakeHandle(d1)}
        info = SimpleNamespace(router=router, handles=handles, block_size=16,
                               model_fingerprint="m", deployment_id="")
        orch = Orchestrator(info, ServingMetrics(), owner="ingress-a")

        async def request(rid: str) -> tuple[RequestRecord, list]:
            rec = RequestRecord(rid, [1, 2, 3], SamplingParams(max_tokens=6), None)
            return rec, [d async for d in orch.run(rec) if d is not None]

        runs = asyncio.gather(request("r1"), request("r2"))
        while len(d0.loop.engine.seqs) < 2:
            await asyncio.sleep(0.01)
        d0.loop.engine.gate.release(2)  # two steps on d0, then it dies
        while d0.loop.engine.steps < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        handles["d0"].kill()
        done = await asyncio.wait_for(runs, 10)
        d0.loop.engine.gate.release(100)
        return done

    done = asyncio.run(run())
    assert sorted(router.rerouted) == [("r1", "d0"), ("r2", "d0")]
    for rec, deltas in done:
        assert rec.status == "ok" and rec.decode_worker == "d1" and deltas[-1].finish_reason == "length"
        # the client got d0's two steps' tokens, then d1's continuation
        assert rec.generated[:2] == [1, 2] and len(rec.generated) == 2 + 6
    assert sorted(router.released) == ["r1", "r2"]
    d0.loop.stop()
    d1.loop.stop()


def test_a_request_that_ended_here_but_runs_on_there_is_aborted_there():
    """Its abort was lost (the ingress stopped listening, the worker never heard): the next outputs
    the stream brings for it abort it, and its blocks are freed long before it would finish."""
    worker = _worker(GatedEngine())

    async def run():
        handle, streams = FakeHandle(worker), StepStreams("ingress-a")
        queue = streams.start("d0", handle, "left", SamplingParams(max_tokens=10**6), None, [1])
        await asyncio.wait_for(queue.get(), 5)
        streams.stop("d0", "left")  # ...and no abort sent
        deadline = asyncio.get_running_loop().time() + 5
        while worker.loop.num_requests:
            assert asyncio.get_running_loop().time() < deadline, "still running on the worker"
            await asyncio.sleep(0.01)
        done = streams.start("d0", handle, "next", SamplingParams(max_tokens=3), None, [1])
        entries = []
        while not entries or not _ended(entries):
            entries += await asyncio.wait_for(done.get(), 5)
        return entries

    entries = asyncio.run(run())
    assert not worker.loop.engine.seqs
    assert [o.new_token_ids for o in entries] == [[1], [2], [3]]  # the stream serves on
    worker.loop.stop()


def test_a_call_ray_cancelled_with_its_request_ends_it_as_cancelled_not_as_a_lost_worker(monkeypatch):
    """Ray cancels the calls a cancelled request has in flight; should that news reach the request
    first, it must not fail over (marking a healthy worker failed), only end and free its slot."""
    cancelled: list = []
    # the real ray.cancel would start a Ray instance here (Ray's auto-init) to cancel a stand-in ref
    monkeypatch.setattr(ray, "cancel", cancelled.append)
    class PrefillRouter(FakeRouter):
        async def _admit(self, request_id: str) -> Admission:
            return Admission(request_id, True, "p0", "d0")

    async def cancelled_by_ray(*_args):
        raise ray.exceptions.TaskCancelledError()

    router = PrefillRouter()
    prefill = SimpleNamespace(prefill=SimpleNamespace(remote=lambda *a: _Ref(cancelled_by_ray(*a))),
                              abort=SimpleNamespace(remote=lambda *a: None))
    info = SimpleNamespace(router=router, handles={"p0": prefill}, block_size=16,
                           model_fingerprint="m", deployment_id="")
    orch = Orchestrator(info, ServingMetrics(), owner="ingress-a")
    rec = RequestRecord("r", [1, 2, 3], SamplingParams(max_tokens=6), None)

    async def run():
        return [d async for d in orch.run(rec)]

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run())
    assert router.rerouted == [] and router.released == ["r"] and rec.status == "cancelled"
    assert len(cancelled) == 1  # the prefill call in flight
    assert not ray.is_initialized()
