"""The router and `pdcluster simulate` place and reject alike: a simulated run's arrival trace (every
admission, prefill completion and release, with the workers' free blocks at that moment) is replayed
through the Router actor's class, which must make the same placements and rejections."""
from __future__ import annotations

import asyncio

import pytest

from pdcluster.actors.router import Router
from pdcluster.actors.worker import WorkerInfo, WorkerReport
from pdcluster.cluster.policy.admission import AdmissionConfig
from pdcluster.cluster.spec import ClusterSpec
from pdcluster.cluster.tools.planner.decode import DecodeModel
from pdcluster.cluster.tools.planner.prefill import PrefillModel
from pdcluster.cluster.tools.planner.profile import HandoffModel, Profile
from pdcluster.cluster.tools.simulator import Topology, Workload, _Simulation


class _Recording:
    """Wraps the simulator's AdmissionController and writes down every call the router would get."""

    def __init__(self, sim: _Simulation) -> None:
        self.sim, self.inner, self.log = sim, sim.ac, []
        self.overcommitted = False  # a request went to a worker without room for it

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _blocks(self) -> dict[str, int]:
        self.overcommitted |= any(n.free_blocks < 0 for n in self.sim.by_id.values())
        return {n.node_id: max(0, n.free_blocks) for n in self.sim.by_id.values()}

    def admit(self, rid, prompt_len, max_tokens, now, tenant=None):
        self.log.append(("admit", rid, prompt_len, max_tokens, self._blocks()))
        return self.inner.admit(rid, prompt_len, max_tokens, now, tenant)

    def observe_prefill(self, tokens, seconds, rids=()):
        self.log.extend(("prefill_done", rid) for rid in rids)
        return self.inner.observe_prefill(tokens, seconds, rids)

    def release(self, rid, now):
        self.log.append(("release", rid, self._blocks()))
        return self.inner.release(rid, now)


def _profile(kv_blocks: int) -> Profile:
    from test_simulator import TOY_ARCH, TOY_HW  # the simulator tests' toy hardware and model

    return Profile("toy", TOY_HW, TOY_ARCH, PrefillModel(5.0, 0.0, mfu=1.0), DecodeModel(10.0, 1e30, 1.0, mfu=1e30),
                   HandoffModel(1000.0, 10.0, 1.0), max_batch_seqs=3, kv_blocks=kv_blocks, block_size=16)


def _infos(sim: _Simulation, profile: Profile) -> list[WorkerInfo]:
    role = {"prefill": "prefill", "decode": "decode", "both": "decode"}
    return [WorkerInfo(worker_id=n.node_id, role=role[n.role], node_id="n", node_ip="127.0.0.1", pid=1,
                       max_model_len=4096, vocab_size=100, block_size=profile.block_size,
                       num_total_blocks=profile.kv_blocks, block_nbytes=1,
                       max_num_seqs=profile.max_batch_seqs, model_fingerprint="toy", kv_store=True)
            for n in sim.by_id.values()]


async def _replay(router: Router, infos: list[WorkerInfo], log: list[tuple]) -> dict[str, str]:
    decisions: dict[str, str] = {}
    pending: dict[str, asyncio.Task] = {}

    def report(blocks: dict[str, int]) -> None:
        router.update_workers(infos, dict.fromkeys(blocks, True), {
            w: WorkerReport(w, "decode", 0, 0, free, router.infos[w].num_total_blocks)
            for w, free in blocks.items()})

    async def settle() -> None:
        await asyncio.sleep(0)
        for rid, task in list(pending.items()):
            if task.done():
                a = task.result()
                decisions[rid] = (f"{a.prefill_worker}/{a.decode_worker}" if a.admitted
                                  else f"rejected: {a.reason}")
                del pending[rid]

    for event in log:
        if event[0] == "admit":
            _, rid, prompt_len, max_tokens, blocks = event
            report(blocks)
            pending[rid] = asyncio.create_task(router.admit(rid, prompt_len, max_tokens, []))
        elif event[0] == "prefill_done":
            router.prefill_done(event[1], 0, 0.0)
        else:
            report(event[2])
            router.release(event[1])
        await settle()
    await settle()
    assert not pending, f"requests the router never decided: {sorted(pending)}"
    return decisions


@pytest.mark.parametrize("topology", [Topology(prefill_nodes=2, decode_nodes=2),
                                      Topology(colocated_nodes=2)], ids=["2P2D", "colocated"])
def test_router_places_and_rejects_as_the_simulator_does(topology: Topology):
    # Few KV blocks (some requests find no decode worker with room and go to the least busy one),
    # a small queue (some are turned away): every branch of admission and placement is taken.
    profile = _profile(kv_blocks=12)
    admission = AdmissionConfig(max_concurrency=7, max_queue=2, min_retry_after_s=0.05)
    sim = _Simulation(profile, topology, Workload(12, input_len=40, output_len=30,
                                                  requests_per_client=3, start_stagger_s=0.01),
                      admission)
    rec = _Recording(sim)
    sim.ac = rec
    sim.run()
    outcomes = set(sim.decisions.values())
    assert rec.overcommitted
    assert any(d.startswith("rejected: queue_full") for d in outcomes)
    assert len([d for d in outcomes if not d.startswith("rejected")]) > 1

    colocated = topology.colocated_nodes > 0
    spec = ClusterSpec.from_dict({
        "prefill": {"replicas": 0 if colocated else topology.prefill_nodes},
        "decode": {"replicas": topology.decode_nodes or topology.colocated_nodes},
        "router": {"max_concurrency": admission.max_concurrency, "max_queue": admission.max_queue}})
    infos = _infos(sim, profile)
    router = Router(spec.to_dict(), infos)
    assert asyncio.run(_replay(router, infos, rec.log)) == sim.decisions
