"""On real Ray: cancelling an actor call (what Serve does when a client leaves) cancels the calls it has
in flight, even those a task it started makes; calls and tasks made through `detached` live on."""
from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_a_cancelled_requests_detached_calls_are_not_cancelled_with_it(ray_local):
    ray = ray_local

    @ray.remote
    class Worker:
        async def work(self, seconds: float) -> str:
            await asyncio.sleep(seconds)
            return "done"

    @ray.remote
    class Ingress:
        def __init__(self, worker) -> None:
            self.worker = worker
            self.stream: asyncio.Task | None = None

        async def request(self, detach: bool) -> None:
            from pdcluster.cluster.serve import detached

            # a long-lived reader the first request happens to start, as StepStreams does
            self.stream = (detached.task if detach else asyncio.create_task)(self._read())
            await asyncio.sleep(100)  # until cancelled

        async def _read(self) -> str:
            return await self.worker.work.remote(2.0)

        def started(self) -> bool:
            return self.stream is not None

        async def stream_result(self) -> str:
            try:
                return await self.stream
            except ray.exceptions.RayError as exc:
                return repr(exc)[:200]

    worker = Worker.remote()
    results = {}
    for detach in (False, True):
        ingress = Ingress.remote(worker)
        call = ingress.request.remote(detach)
        deadline = time.monotonic() + 30
        while not ray.get(ingress.started.remote()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ray.cancel(call)
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(call, timeout=30)
        results[detach] = ray.get(ingress.stream_result.remote(), timeout=30)
    # The control: without `detached` the reader's call went down with the request it started in.
    assert "TaskCancelledError" in results[False], results
    assert results[True] == "done", results
