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
        def __init__(self) -> None:
            self.released = asyncio.Event()

        async def work(self) -> str:
            await self.released.wait()
            return "done"

        def release(self) -> None:
            self.released.set()

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
            return await self.worker.work.remote()

        def started(self) -> bool:
            return self.stream is not None

        def stream_ended(self) -> bool:
            return self.stream.done()

        async def stream_result(self) -> str:
            try:
                return await self.stream
            except ray.exceptions.RayError as exc:
                return repr(exc)[:200]

    def wait_for(predicate, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    results = {}
    for detach in (False, True):
        worker = Worker.remote()
        ingress = Ingress.remote(worker)
        call = ingress.request.remote(detach)
        wait_for(lambda i=ingress: ray.get(i.started.remote()))
        ray.cancel(call)
        with pytest.raises(ray.exceptions.TaskCancelledError):
            ray.get(call, timeout=30)
        if detach:
            time.sleep(1.0)  # what was cancelled with the request has been by now
            assert not ray.get(ingress.stream_ended.remote())
        else:  # the reader's call goes down with the request it started in
            wait_for(lambda i=ingress: ray.get(i.stream_ended.remote()))
        ray.get(worker.release.remote())
        results[detach] = ray.get(ingress.stream_result.remote(), timeout=30)
    # The control: without `detached` the reader's call went down with the request it started in.
    assert "TaskCancelledError" in results[False], results
    assert results[True] == "done", results
