"""The master supervisor without Ray or a real master: an external master (the KubeRay sidecar) is
waited for and never started a second time on its ports; a managed one is started when none answers."""
from __future__ import annotations

import asyncio

import pytest
import yaml
from pdcluster.actors import master_supervisor as ms
from pdcluster.cluster.launch.render import kubernetes_spec, rayservice
from pdcluster.cluster.spec import ClusterSpec, StoreSpec

STARTED: list[FakeMaster] = []


class FakeMaster:

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    def start(self) -> None:
        STARTED.append(self)

    def running(self) -> bool:
        return True


@pytest.fixture
def supervisor(monkeypatch):
    STARTED.clear()
    monkeypatch.setattr(ms, "MooncakeMaster", FakeMaster)
    monkeypatch.setattr(ms, "EXTERNAL_POLL_S", 0.01)

    async def status(self):
        return self.master is not None

    monkeypatch.setattr(ms.MasterSupervisor, "status", status)

    def make(answers_after: int | None, **store) -> ms.MasterSupervisor:
        sup = ms.MasterSupervisor(StoreSpec(**store).model_dump())
        calls = iter(range(10**6))
        sup._answers = lambda: answers_after is not None and next(calls) >= answers_after
        return sup

    return make


def test_an_external_master_that_starts_late_is_waited_for_never_started(supervisor):
    sup = supervisor(answers_after=5, master="external")
    assert asyncio.run(sup.start()) is False  # not managed: adopted once it answers
    assert sup.master is None and STARTED == []


def test_an_external_master_that_never_answers_fails_the_start_naming_it(supervisor):
    sup = supervisor(answers_after=None, master="external", master_wait_s=0.2)
    with pytest.raises(TimeoutError, match=r"external mooncake_master at 127.0.0.1:50051"):
        asyncio.run(sup.start())
    assert STARTED == []


def test_a_managed_master_is_started_when_none_answers(supervisor):
    sup = supervisor(answers_after=None)

    async def start_then_stop():
        managed = await sup.start()
        sup._monitor.cancel()
        return managed

    assert asyncio.run(start_then_stop()) is True and len(STARTED) == 1


def test_kubernetes_renders_the_sidecar_as_the_external_master():
    spec = ClusterSpec.from_dict({"engine": {"device": "cpu"}})
    assert spec.store.master == "managed" and kubernetes_spec(spec).store.master == "external"
    serve_config = yaml.safe_load(rayservice(spec)["spec"]["serveConfigV2"])
    assert serve_config["applications"][0]["args"]["spec"]["store"]["master"] == "external"
