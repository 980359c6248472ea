"""The engine in its own process (`EngineCore`), with a tiny random Llama: its streams are the
in-process engine's greedy outputs, aborts and refusals cross the pipe and free their blocks, a
dead engine process fails its requests and tells the worker, and the child ends with its pipe."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from pdcluster.actors.engine_core import CoreSetup, EngineCore
from pdcluster.actors.engine_loop import RequestAborted
from pdcluster.cluster.spec import ClusterSpec
from pdcluster.engine.llm_engine import LLMEngine
from pdcluster.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [7] * 20, list(range(200, 233))]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    from model_factory import llama_config, save_model
    return str(save_model(llama_config(), tmp_path_factory.mktemp("tiny-llama")))


def _spec(model: str) -> dict:
    # no store answers on these ports: the engine runs without one (decode would recompute)
    return ClusterSpec.from_dict({"model": {"path": model},
                                  "engine": {"device": "cpu", "num_kv_blocks": 30, "threads": 1},
                                  "store": {"rpc_port": 1, "metadata_port": 2}}).to_dict()


def _core(spec: dict, exits: list[str], name: str = "test-worker", **config) -> EngineCore:
    from dataclasses import replace
    return EngineCore(CoreSetup(spec, name, replace(ClusterSpec.from_dict(spec).engine_config(), **config),
                                "127.0.0.1", "", node_store=False), on_exit=exits.append)


@pytest.fixture(scope="module")
def core(model):
    exits: list[str] = []
    core = _core(_spec(model), exits)
    core.exits = exits
    yield core
    core.stop()


def _run(core: EngineCore, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Submit all `requests` at once; each one's outputs (or its exception) until it ends."""
    async def go():
        queues = {}
        for rid, (prompt, params) in requests.items():
            queues[rid] = asyncio.Queue()
            core.submit(rid, prompt, params, queues[rid].put_nowait)
        got: dict[str, list] = {rid: [] for rid in requests}
        for rid, q in queues.items():
            while True:
                item = await asyncio.wait_for(q.get(), 120)
                got[rid].append(item)
                if isinstance(item, BaseException) or item.finished:
                    break
        return got
    return asyncio.run(go())


def _wait_free(core: EngineCore) -> None:
    deadline = time.monotonic() + 30
    while (s := core.stats()).num_free_blocks != s.num_total_blocks or s.num_running:
        assert time.monotonic() < deadline, s
        time.sleep(0.05)


def test_streams_match_the_engine_in_this_process(core, model):
    engine = LLMEngine(ClusterSpec.from_dict(_spec(model)).engine_config())
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"ref{i}", prompt_token_ids=prompt, params=params)
    expected: dict[str, list[int]] = {f"ref{i}": [] for i in range(len(PROMPTS))}
    while engine.has_unfinished_requests():
        for out in engine.step():
            expected[out.request_id] += out.new_token_ids
    del engine

    got = _run(core, {f"r{i}": (p, params) for i, p in enumerate(PROMPTS)})
    for i in range(len(PROMPTS)):
        outs = got[f"r{i}"]
        assert all(not isinstance(o, BaseException) for o in outs), outs
        assert [t for o in outs for t in o.new_token_ids] == expected[f"ref{i}"]
        assert outs[-1].finish_reason == "length" and len(expected[f"ref{i}"]) == 12
    assert core.facts["num_total_blocks"] == 30 and core.facts["kv_store"] is False
    _wait_free(core)


def test_a_stream_interval_keeps_the_tokens_and_sends_them_in_runs(model):
    spec = _spec(model)
    spec["engine"]["stream_interval"] = 5
    exits: list[str] = []
    cores = [_core(_spec(model), exits, "plain"), _core(spec, exits, "coalescing")]
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        plain, runs = (_run(c, {"r": (PROMPTS[1], params)})["r"] for c in cores)
    finally:
        for c in cores:
            c.stop()
    assert [t for o in runs for t in o.new_token_ids] == [t for o in plain for t in o.new_token_ids]
    assert "".join(o.delta_text for o in runs) == "".join(o.delta_text for o in plain)
    assert len(plain) == 12 and [len(o.new_token_ids) for o in runs] == [1, 5, 5, 1]
    assert runs[-1].finish_reason == "length" and not exits


def test_abort_and_refusal_cross_the_pipe_and_free_the_blocks(core):
    async def go():
        q: asyncio.Queue = asyncio.Queue()
        core.submit("long", PROMPTS[1], SamplingParams(max_tokens=400, ignore_eos=True), q.put_nowait)
        first = await asyncio.wait_for(q.get(), 60)
        assert not isinstance(first, BaseException)
        core.abort("long")
        while not isinstance(item := await asyncio.wait_for(q.get(), 10), BaseException):
            pass  # outputs already on their way
        assert isinstance(item, RequestAborted)
        too_long = asyncio.Queue()
        # within the context (512), beyond the cache (30 blocks of 16)
        core.submit("huge", [5] * 300, SamplingParams(max_tokens=200), too_long.put_nowait)
        return await asyncio.wait_for(too_long.get(), 30)

    refused = asyncio.run(go())
    # the engine's refusal arrives as a ValueError (the client's 400), and the engine steps on
    assert type(refused) is ValueError and "KV cache" in str(refused)
    _wait_free(core)
    (outs,) = _run(core, {"after": (PROMPTS[0], SamplingParams(max_tokens=3, temperature=0))}).values()
    assert outs[-1].finished and not core.exits


def test_a_command_that_cannot_cross_the_pipe_leaves_nothing_behind(core):
    async def go():
        with pytest.raises(Exception, match="pickle"):
            core.submit("odd", PROMPTS[0], SamplingParams(max_tokens=2), lambda _: None,
                        generated_token_ids=(t for t in ()))   # a generator does not pickle
        # not registered: the same id is taken afterwards, and served
        q: asyncio.Queue = asyncio.Queue()
        core.submit("odd", PROMPTS[0], SamplingParams(max_tokens=2, temperature=0), q.put_nowait)
        while not (item := await asyncio.wait_for(q.get(), 60)).finished:
            pass
        return item

    assert asyncio.run(go()).finish_reason == "length"
    assert core.abort_all() == 0 and not core.exits


def test_a_dead_engine_process_fails_its_requests_and_tells_the_worker(model):
    exits: list[str] = []
    core = _core(_spec(model), exits, "doomed")

    async def go():
        q: asyncio.Queue = asyncio.Queue()
        core.submit("r", PROMPTS[0], SamplingParams(max_tokens=400, ignore_eos=True), q.put_nowait)
        assert not isinstance(await asyncio.wait_for(q.get(), 60), BaseException)
        os.kill(core.pid, signal.SIGKILL)
        while not isinstance(item := await asyncio.wait_for(q.get(), 30), BaseException):
            pass
        return item

    err = asyncio.run(go())
    assert isinstance(err, RuntimeError) and "engine process" in str(err)
    assert len(exits) == 1 and f"pid {core.pid}" in exits[0] and str(-signal.SIGKILL) in exits[0]

    async def later():
        core.submit("r2", PROMPTS[0], SamplingParams(max_tokens=2), lambda _: None)

    with pytest.raises(RuntimeError, match="engine process"):
        asyncio.run(later())


def test_the_child_exits_when_its_pipe_ends(model):
    # stop() ends the pipe, as the kernel does when the worker's process dies by any signal
    exits: list[str] = []
    core = _core(_spec(model), exits, "short")
    t0 = time.monotonic()
    core.stop()
    assert core._proc.returncode == 0 and time.monotonic() - t0 < 5  # it left by itself
    assert not exits  # a stop is not a crash


def test_a_build_failure_is_raised_by_the_constructor(model):
    with pytest.raises(RuntimeError, match="could not be built.*nonexistent"):
        _core(_spec(model), [], "bad", model="/nonexistent/model")
