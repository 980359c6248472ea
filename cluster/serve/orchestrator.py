"""One request's way through the cluster, as the ingress runs it: admit -> prefill -> decode -> release.

`RequestRecord` is everything the ingress knows of a request; `Orchestrator.run` moves it through the
router and the workers (failing over to another worker when one dies) and frees what it held, once;
its decode outputs come over the replica's step streams (step_streams.py). `merge_choices`
interleaves the runs of a request's n choices.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray

from ...actors.controller import ClusterInfo
from ...actors.engine_loop import RequestAborted
from ...actors.router import Admission, LeasedRequest
from ...engine.outputs import RequestOutput, TokenLogprob
from ...engine.prefix_hash import model_salt
from ...engine.sampling import SamplingParams
from ..policy.prefix_affinity import prefix_block_hashes
from . import detached
from . import openai_protocol as oai
from .metrics import ServingMetrics
from .step_streams import StepStreams, WorkerLost, cancelled_with_request

log = logging.getLogger(__name__)

MAX_FAILOVERS = 2  # per request and phase: how many lost workers a request survives
# Admission reject reasons that are not "busy, retry later"
_REJECT_STATUS = {"no_worker": 503, "draining": 503}
_REJECT_MESSAGE = {"draining": "the server is shutting down and admits no new requests; retry "
                               "on another replica or later"}


@dataclass
class RequestRecord:
    """One request from the moment its prompt is known to its release."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    tenant: str | None
    arrived: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))  # its responses' `created` (Unix s)
    prefill_worker: str | None = None
    decode_worker: str | None = None
    handoff: bytes | None = None  # kv.proto bytes from prefill, kept for a decode failover
    generated: list[int] = field(default_factory=list)  # every token the client has been sent
    first_token_at: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    status: str = "error"  # how it ended: ok, error, rejected, cancelled

    @property
    def output_tokens(self) -> int:
        return len(self.generated)

    def usage(self) -> dict[str, Any]:
        return oai.usage(self.prompt_tokens, self.output_tokens, self.cached_tokens)


@dataclass(frozen=True)
class Delta:
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] = field(default_factory=list)   # one per token, when asked for


def grammar_failed(message: str | None) -> oai.OpenAIError:
    """The request's structured output dead-ended mid-generation (the engine ended it alone)."""
    return oai.OpenAIError(400, message or "structured output failed", param="response_format",
                           code="structured_output_failed")


def stopped() -> oai.OpenAIError:
    """A worker aborted the request (the end of a drain that timed out)."""
    return oai.OpenAIError(503, "the request was stopped before it finished because the server is "
                           "shutting down; retry", code="aborted", retry_after_s=1.0)


def _unwrap(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


def _request_error(exc: BaseException, worker_id: str) -> Exception:
    """What the client gets for a worker's error about its request: a request the worker refused is
    a 400, one it aborted the drain's 503, any other failure a 500."""
    if isinstance(exc, ValueError):
        return oai.OpenAIError(400, str(exc))
    if isinstance(exc, RequestAborted):
        return stopped()
    log.error("worker %s failed: %s: %s", worker_id, type(exc).__name__, exc)
    return oai.OpenAIError(500, f"internal error on worker {worker_id}")


def _outputs(entries: list, worker_id: str) -> list[RequestOutput]:
    """A request's outputs from its step-stream entries; raises the error that ends it, if any."""
    for entry in entries:
        if isinstance(entry, WorkerLost):
            raise entry
        if isinstance(entry, BaseException):
            raise _request_error(entry, worker_id) from None
    return list(entries)


class Orchestrator:
    """Runs requests for one ingress replica, `owner`; `live` is what it runs now, which it tells
    the router through its lease (`renew_lease`)."""

    def __init__(self, info: ClusterInfo, metrics: ServingMetrics, owner: str = "") -> None:
        self.info = info
        self.router = info.router
        self.metrics = metrics
        self.owner = owner
        self.live: dict[str, RequestRecord] = {}
        self.streams = StepStreams(owner)

    async def renew_lease(self) -> None:
        """Tell the router this replica lives and what it runs; describe the requests it does not
        know (it restarted) so it counts their slots and workers again."""
        unknown = await self.router.renew.remote(self.owner, list(self.live))
        leased = [self._leased(self.live[r]) for r in unknown if r in self.live]
        if leased:
            await self.router.restore.remote(self.owner, leased)

    def _leased(self, rec: RequestRecord) -> LeasedRequest:
        return LeasedRequest(rec.request_id, len(rec.prompt_ids), rec.params.max_tokens,
                             self.prefix_hashes(rec.prompt_ids), rec.tenant, rec.prefill_worker,
                             rec.decode_worker, prefilled=rec.first_token_at is not None)

    async def run(self, rec: RequestRecord) -> AsyncIterator[Delta | None]:
        """Admission, prefill, decode. Yields None once admitted (so the caller can still answer
        429 before streaming starts), then one Delta per batch of new tokens.

        Whatever ends it (finish, error, rejection, the client leaving) its `finally` frees the
        request's KV blocks on the workers and its admission slot, exactly once."""
        in_prefill = None  # the prefill call in flight, cancelled if the request ends
        in_decode: str | None = None  # the decode worker running it, told to abort if it ends early
        try:
            admission: Admission = await self.router.admit.remote(
                rec.request_id, len(rec.prompt_ids), rec.params.max_tokens,
                self.prefix_hashes(rec.prompt_ids), rec.tenant, self.owner)
            if not admission.admitted:
                rec.status = "rejected"
                self.metrics.rejections.labels(admission.reason).inc()
                raise oai.OpenAIError(
                    _REJECT_STATUS.get(admission.reason, 429),
                    _REJECT_MESSAGE.get(admission.reason,
                                        f"the server is at capacity ({admission.reason}); retry later"),
                    code=admission.reason, retry_after_s=admission.retry_after_s)
            self.metrics.admissions.inc()
            rec.prefill_worker, rec.decode_worker = admission.prefill_worker, admission.decode_worker
            self.live[rec.request_id] = rec
            yield None

            finish = None
            if rec.prefill_worker is not None:  # disaggregated; without a prefill pool decode does it all
                for attempt in range(MAX_FAILOVERS + 1):
                    in_prefill = self.info.handles[rec.prefill_worker].prefill.remote(
                        rec.request_id, rec.prompt_ids, rec.params)
                    try:
                        first = await self._call(in_prefill, rec.prefill_worker)
                        break
                    except WorkerLost:  # nothing streamed yet: run the prompt on another worker
                        in_prefill = None
                        rec.prefill_worker = await self._replacement(rec, rec.prefill_worker, attempt)
                in_prefill = None
                self._first_token(rec, first.num_prompt_tokens, first.num_cached_tokens)
                self.router.prefill_done.remote(rec.request_id)
                rec.handoff, finish = first.handoff, first.finish_reason
                rec.generated += first.token_ids
                if first.finish_reason == "error":
                    raise grammar_failed(first.error)
                yield Delta(first.token_ids, first.text, first.finish_reason, first.logprobs)

            if finish is None:
                handed_off = rec.output_tokens
                for attempt in range(MAX_FAILOVERS + 1):
                    # The handoff carries the prompt and the first token; after a failover the new
                    # worker continues after every token the client already has.
                    colocated = rec.handoff is None
                    in_decode = rec.decode_worker
                    entries = self.streams.start(
                        in_decode, self.info.handles[in_decode], rec.request_id, rec.params,
                        rec.handoff, rec.prompt_ids if colocated else (),
                        rec.generated if colocated else rec.generated[1:])
                    try:
                        while finish is None:
                            outs = _outputs(await entries.get(), in_decode)
                            while not entries.empty():  # steps that came meanwhile: one Delta
                                outs += _outputs(entries.get_nowait(), in_decode)
                            if rec.first_token_at is None:  # colocated: decode ran the prompt
                                self._first_token(rec, outs[0].num_prompt_tokens,
                                                  outs[0].num_cached_tokens)
                                self.router.prefill_done.remote(rec.request_id)
                            elif rec.output_tokens == handed_off:
                                self.metrics.first_to_second_token.observe(
                                    time.perf_counter() - rec.first_token_at)
                            ids = [t for o in outs for t in o.new_token_ids]
                            rec.generated += ids
                            finish = outs[-1].finish_reason
                            text = "".join(o.delta_text for o in outs)
                            logprobs = [lp for o in outs for lp in o.logprobs]
                            if finish == "error":   # what came before the dead end, then the error
                                if ids:
                                    yield Delta(ids, text, None, logprobs)
                                raise grammar_failed(outs[-1].error)
                            yield Delta(ids, text, finish, logprobs)
                        break
                    except WorkerLost:
                        self.streams.stop(in_decode, rec.request_id)
                        in_decode = None
                        rec.decode_worker = await self._replacement(rec, rec.decode_worker, attempt)
                self.streams.stop(in_decode, rec.request_id)
                in_decode = None
            rec.status = "ok"
        except (asyncio.CancelledError, GeneratorExit):
            rec.status = "cancelled"
            raise
        finally:
            # The calls below are detached: Ray would cancel a cancelled request's own calls with it.
            self.live.pop(rec.request_id, None)  # unlisted, the router frees it even if release is lost
            if in_prefill is not None:
                try:
                    ray.cancel(in_prefill)
                except Exception as exc:  # noqa: BLE001 - the abort below still frees its blocks
                    log.warning("cancelling %s's prefill on %s failed: %s", rec.request_id,
                                rec.prefill_worker, exc)
                detached.call(self.info.handles[rec.prefill_worker].abort.remote, rec.request_id)
            if in_decode is not None:  # ended early (an error, the client left): free its blocks
                self.streams.stop(in_decode, rec.request_id)
                detached.call(self.info.handles[in_decode].abort.remote, rec.request_id)
            detached.call(self.router.release.remote, rec.request_id)
            self._observe_end(rec)

    def prefix_hashes(self, prompt_ids: list[int]) -> list[str]:
        """The prompt's full-block chain hashes, salted as TP rank 0's engine salts them: the
        router's affinity names the same blocks as the store keys (`pdkv/<hash>`)."""
        return prefix_block_hashes(prompt_ids, self.info.block_size,
                                   model_salt(self.info.model_fingerprint, 0, self.info.deployment_id))

    def _first_token(self, rec: RequestRecord, prompt_tokens: int, cached_tokens: int) -> None:
        """Record the first token's arrival (TTFT) and the prompt's counts."""
        rec.first_token_at = time.perf_counter()
        rec.prompt_tokens, rec.cached_tokens = prompt_tokens, cached_tokens
        self.metrics.ttft.observe(rec.first_token_at - rec.arrived)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.prefix_hit_tokens.inc(cached_tokens)

    async def _call(self, ref, worker_id: str) -> Any:
        """Await a worker call: its error about the request as `_request_error` says, a worker that
        died or cannot be reached is `WorkerLost` (the caller fails over), and a call Ray cancelled
        with this request is this request's cancellation."""
        try:
            return await ref
        except ray.exceptions.RayError as exc:
            if cancelled_with_request(exc):  # not the worker's doing: no failover, no error logged
                raise asyncio.CancelledError from None
            if isinstance(exc, ray.exceptions.RayTaskError):
                raise _request_error(_unwrap(exc), worker_id) from None
            log.error("worker %s lost: %s: %s", worker_id, type(exc).__name__, exc)
            raise WorkerLost(worker_id) from exc

    async def _replacement(self, rec: RequestRecord, failed: str, attempt: int) -> str:
        """Another worker of `failed`'s role for this request (the router stops using `failed`)."""
        worker = await self.router.reroute.remote(rec.request_id, failed)
        if worker is None or attempt >= MAX_FAILOVERS:
            raise oai.OpenAIError(503, f"worker {failed} is unavailable; retry",
                                  code="worker_unavailable", retry_after_s=1.0)
        log.warning("request %s moves from %s to %s", rec.request_id, failed, worker)
        return worker

    def _observe_end(self, rec: RequestRecord) -> None:
        m = self.metrics
        m.requests.labels(rec.status).inc()
        if rec.status == "rejected":
            return
        end = time.perf_counter()
        m.generation_tokens.inc(rec.output_tokens)
        if rec.status == "ok":
            m.e2e.observe(end - rec.arrived)
            if rec.first_token_at is not None and rec.output_tokens > 1:
                m.tpot.observe((end - rec.first_token_at) / (rec.output_tokens - 1))


async def merge_choices(steps: list[AsyncIterator[Delta]],
                        first: Delta | None) -> AsyncIterator[tuple[int, Delta]]:
    """(choice index, delta) from each choice's admitted steps as they come; `first`: choice 0's
    first delta, already taken. Closing it closes every choice (their requests are released)."""
    if len(steps) == 1:
        try:
            async for d in steps[0]:
                yield 0, d
        finally:
            await steps[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[Delta]) -> None:
        try:
            async for d in s:
                await queue.put((i, d))
            await queue.put((i, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, exc))

    if first is not None:
        queue.put_nowait((0, first))
    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(steps)]
    try:
        running = len(steps)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await asyncio.gather(*(s.aclose() for s in steps), return_exceptions=True)
