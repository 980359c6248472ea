"""Engines on one host share its cores step by step: a decode engine with enough sequences steps on
the cores an idle prefill engine leaves and gives them back once that one works; a dead engine's
last post is ignored; the engine loop sizes each step that way and gives its cores up when idle."""
from __future__ import annotations

import asyncio
import select
import subprocess
import sys
import textwrap
import time

import pytest

from pdcluster.actors.core_share import CoreBoard, CoreShare
from pdcluster.actors.engine_loop import EngineLoop
from pdcluster.cluster.policy.engine_threads import (
    EXPAND_FROM_SEQS,
    LIGHT_STREAM_INTERVAL,
    expand_from_seqs,
    most_threads,
    step_threads,
)
from pdcluster.engine.sampling import SamplingParams

from test_engine_loop import FakeEngine, _drain, _submit

MANY = EXPAND_FROM_SEQS


def test_decode_takes_the_cores_others_leave_and_small_batches_keep_their_share():
    assert step_threads(share=1, most=2, others_busy=0, decode_seqs=MANY) == 2
    assert step_threads(share=1, most=2, others_busy=1, decode_seqs=MANY) == 1
    assert step_threads(share=1, most=2, others_busy=2, decode_seqs=MANY) == 1   # never below its share
    assert step_threads(share=1, most=2, others_busy=0, decode_seqs=MANY - 1) == 1
    assert step_threads(share=1, most=2, others_busy=0, decode_seqs=0) == 1   # prompt work
    # 16 cores, four engines of 4: a decode engine takes what the busy others leave
    assert step_threads(share=4, most=16, others_busy=4 + 4, decode_seqs=64) == 8
    assert step_threads(share=4, most=4, others_busy=0, decode_seqs=64) == 4      # a prefill engine
    # streams that leave the engine 8 tokens at a time: a step of one sequence takes idle cores too
    light = expand_from_seqs(LIGHT_STREAM_INTERVAL)
    assert expand_from_seqs(1) == expand_from_seqs(LIGHT_STREAM_INTERVAL - 1) == EXPAND_FROM_SEQS
    assert step_threads(share=1, most=2, others_busy=0, decode_seqs=1, expand_from=light) == 2
    assert step_threads(share=1, most=2, others_busy=0, decode_seqs=0, expand_from=light) == 1
    assert step_threads(share=1, most=2, others_busy=1, decode_seqs=1, expand_from=light) == 1


def test_only_decode_engines_without_the_host_to_themselves_take_more_than_their_share():
    assert most_threads("decode", share=1, usable=2, tp_size=1) == 2
    assert most_threads("prefill", share=1, usable=2, tp_size=1) == 1     # posts, keeps its share
    assert most_threads("decode", share=2, usable=2, tp_size=1) == 0      # colocated: all cores
    assert most_threads("decode", share=2, usable=8, tp_size=2) == 0      # TP ranks keep theirs


@pytest.fixture
def board_path(tmp_path):
    return str(tmp_path / "cores")


def test_two_engines_take_turns_on_the_board(board_path):
    decode = CoreShare.open(1, 2, board_path)
    prefill = CoreShare.open(1, 1, board_path)
    assert decode.board.slot != prefill.board.slot
    assert decode.claim(MANY) == 2                    # the prefill engine idles
    assert prefill.claim(1) == 1
    assert decode.claim(MANY) == 1                    # it works: the decode steps give the core back
    prefill.release()
    assert decode.claim(MANY) == 2
    decode.release()
    assert decode.board.others_busy() == 0 and prefill.board.others_busy() == 0
    decode.close()
    prefill.close()
    assert CoreShare.open(1, 0, board_path) is None   # most 0: fixed threads, no board
    light = CoreShare.open(1, 2, board_path, stream_interval=LIGHT_STREAM_INTERVAL)
    assert light.claim(1) == 2 and light.claim(0) == 1   # one stream, 8 tokens at a time; a prompt
    light.close()


def test_a_dead_engines_post_is_ignored_and_its_slot_reused(board_path):
    share = CoreShare.open(1, 2, board_path)
    script = textwrap.dedent(f"""
        import os, sys, time
        from pdcluster.actors.core_share import CoreBoard
        board = CoreBoard({board_path!r})
        board.post(2)
        print(board.slot, flush=True)
        if sys.argv[1] == "die":
            os._exit(0)
        time.sleep(30)
    """)
    live = subprocess.Popen([sys.executable, "-c", script, "live"], stdout=subprocess.PIPE, text=True)
    try:
        assert select.select([live.stdout], [], [], 60)[0], "the live engine did not take a slot"
        live_slot = int(live.stdout.readline())
        assert share.board.others_busy() == 2 and share.claim(MANY) == 1
        dead = subprocess.run([sys.executable, "-c", script, "die"], capture_output=True, text=True,
                              timeout=60, check=True)
        dead_slot = int(dead.stdout)
        assert dead_slot not in (live_slot, share.board.slot)
        assert share.board.others_busy() == 2         # the dead one's 2 is still written, not counted
    finally:
        live.kill()
        live.wait()
    assert share.board.others_busy() == 0 and share.claim(MANY) == 2
    newcomer = CoreBoard(board_path)
    assert newcomer.slot in (live_slot, dead_slot)    # freed by their deaths
    newcomer.close()
    share.close()


class ThreadsEngine(FakeEngine):
    """Records the threads each step ran on."""

    def __init__(self) -> None:
        super().__init__()
        self.threads = 1
        self.stepped_on: list[int] = []

    def set_threads(self, threads: int) -> None:
        self.threads = threads

    def decode_batch(self) -> int:
        return len(self.seqs)

    def step(self):
        self.stepped_on.append(self.threads)
        return super().step()


def test_the_engine_loop_sizes_each_step_and_gives_its_cores_up_when_idle(board_path):
    other = CoreShare.open(1, 1, board_path)   # the host's prefill engine
    loop = EngineLoop(lambda: ThreadsEngine(), cores=CoreShare.open(1, 2, board_path))

    ids = iter(range(1000))

    async def run(n: int, tokens: int):
        with loop._cond:   # all in before the engine thread looks: every step has all n
            queues = [_submit(loop, f"r{next(ids)}", [1], SamplingParams(max_tokens=tokens))
                      for _ in range(n)]
        return await asyncio.gather(*(_drain(q) for q in queues))

    try:
        _sized_steps(loop, other, run)
    finally:
        loop.stop()
        other.close()


def _sized_steps(loop: EngineLoop, other: CoreShare, run) -> None:
    asyncio.run(run(MANY, 3))
    assert set(loop.engine.stepped_on) == {2}            # alone on the host, enough sequences
    deadline = time.monotonic() + 5
    while other.board.others_busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert other.board.others_busy() == 0                # idle: nothing posted
    loop.engine.stepped_on.clear()
    asyncio.run(run(1, 3))
    assert set(loop.engine.stepped_on) == {1}            # one sequence: its share
    other.claim(1)
    loop.engine.stepped_on.clear()
    asyncio.run(run(MANY, 3))
    assert set(loop.engine.stepped_on) == {1}            # the prefill engine works
