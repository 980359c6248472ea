"""The engine loop: requests in, one scheduled model step at a time, token deltas out.

`add_request` / `step` / `abort_request` is the streaming API the Ray actors wrap; `LLM` (llm.py)
is the offline API on top of it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent import futures
from dataclasses import asdict, dataclass, replace

import torch

from .block_manager import BlockManager
from .config import EngineConfig
from .cpu_kernels import fused_ops_kernel, paged_decode_kernel
from .detokenizer import IncrementalDetokenizer
from .device import keep_freed_memory, select_device, select_dtype
from .distributed import init_tensor_parallel
from .kv_connector import KVConnector
from .kv_handoff import KVHandoff, KVLayout
from .kv_io import KVExchange, KVLoad
from .kv_transfers import KVTransfers
from .latency_histogram import LatencyHistogram
from .layers.cpu_linear import resolve_matmul_activations, use_block_kernels
from .model_runner import ModelRunner
from .models import model_class
from .models.llama_decode_step import use_decode_layers
from .outputs import RequestOutput, TokenLogprob
from .prefix_hash import model_salt
from .sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .spec_decode.mtp import MtpDrafter
from .spec_decode.ngram import NgramDrafter
from .stats import EngineStats
from .structured_output import GrammarCompiler
from .tokenizer import Tokenizer
from .weights import content_digest, load_checkpoint, resolve_model_path

log = logging.getLogger(__name__)

MAX_DEFAULT_MODEL_LEN = 8192
IDLE_WAIT_S = 0.05  # an idle step waits this long at most for a KV transfer to finish
# A step that leaves prompts' blocks being stored waits this share of its own time (at most
# SAVE_GRACE_MAX_S) for them, so that their first tokens go out with this step, not after the next
# (a long prompt's next chunk can take seconds).
SAVE_GRACE_SHARE = 0.05
SAVE_GRACE_MAX_S = 0.05


@dataclass
class _Compiling:
    """A request added while its grammar compiles: queued once `compiled` is done."""
    compiled: futures.Future
    seq: Sequence
    detok: IncrementalDetokenizer
    resumed: list[int]


class LLMEngine:
    def __init__(self, config: EngineConfig = EngineConfig()) -> None:
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        # torch's (and its OpenMP's) thread count is per thread: the one this engine is built on
        # is the one it steps on (actors/engine_loop.py)
        self.threads = torch.get_num_threads()
        self.device = select_device(config.device)
        self.dtype = select_dtype(config.dtype, self.device)
        self.kv_dtype = self.dtype if config.kv_cache_dtype == "auto" else select_dtype(
            config.kv_cache_dtype, self.device)
        path = resolve_model_path(config.model)
        self.model_path = path
        hf_config, weights = load_checkpoint(path)
        self.hf_config = hf_config
        self.tokenizer = Tokenizer(path)
        if not hf_config.get("vocab_size"):
            hf_config["vocab_size"] = self.tokenizer.vocab_size
        self.model = self._build_model(hf_config, weights)
        # what GGUF-block layers multiply their input as (float32 | int16 | int8)
        self.matmul_activations = resolve_matmul_activations(config.matmul_activations,
                                                             self.device.type)
        if self.device.type == "cpu":
            # before sizing the KV cache: the blocks take memory
            switched = use_block_kernels(self.model, self.matmul_activations)
            if not switched:
                if config.matmul_activations not in ("auto", "float32"):
                    log.warning("matmul_activations=%s: no layer runs on the integer kernel (it takes "
                                "GGUF-block layers only, and needs the kernel built): the matmuls stay "
                                "float32", config.matmul_activations)
                self.matmul_activations = "float32"
            use_decode_layers(self.model)
        self.fingerprint = _fingerprint(path, hf_config, self.dtype, self.kv_dtype)
        self.max_model_len = config.max_model_len or min(
            hf_config.get("max_position_embeddings", MAX_DEFAULT_MODEL_LEN), MAX_DEFAULT_MODEL_LEN)
        self.kv_cache = self._allocate_kv_cache()
        self.block_manager = BlockManager(self.kv_cache.shape[0], config.block_size,
                                          config.enable_prefix_caching,
                                          model_salt(self.fingerprint, config.tp_rank, config.deployment_id),
                                          drop_last_hit=self._mtp)
        self.kv_layout = KVLayout(
            kind="mla" if len(self.model.kv_token_shape) == 1 else "mha",
            num_layers=self.model.num_layers, block_size=config.block_size,
            token_shape=tuple(self.model.kv_token_shape), dtype=str(self.kv_dtype).removeprefix("torch."),
            block_nbytes=self.block_nbytes, num_mtp_layers=int(self._mtp))
        self.kv = KVExchange(self.kv_cache, self.block_manager, self.kv_layout, self.fingerprint)
        self.transfers = KVTransfers(self.kv) if config.async_kv_transfer else None
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs,
                                   config.max_num_batched_tokens,
                                   on_admit=self._start_import if self.transfers is not None
                                   else self.kv.on_admit)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids)
        eos = hf_config.get("eos_token_id")
        self.eos_token_ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.runner = ModelRunner(self.model, self.kv_cache, config.block_size, self.device,
                                  frozenset(self.eos_token_ids))
        self._grammar: GrammarCompiler | None = None
        if self.device.type == "cpu":
            # after loading, so the weights' load-time temporaries were returned the usual way
            keep_freed_memory()
            paged_decode_kernel()  # built (or found) now rather than in the first request's step
            fused_ops_kernel()
        self._seqs: dict[str, Sequence] = {}
        self._compiling: dict[str, _Compiling] = {}   # requests waiting for their grammar
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._saved_outputs: dict[str, RequestOutput] = {}  # first tokens held until their KV is stored
        self._step_time = LatencyHistogram()
        self._step_thread_seconds = 0.0
        self._kv_wait = LatencyHistogram()
        self._computed_tokens = 0
        self._prefix_hits = 0
        self._preemptions = 0
        spec = config.speculative_config
        self.drafter = (None if spec is None
                        else MtpDrafter(self.model, self.kv_cache, self.block_manager, self.device)
                        if self._mtp else NgramDrafter(spec.prompt_lookup_max, spec.prompt_lookup_min))
        self._draft_tokens = 0
        self._accepted_tokens = 0
        self._prefill_tokens = 0
        self._prefill_seconds = 0.0
        self._verifications = 0
        log.info("engine ready: %s on %s/%s, %d %s KV blocks of %d tokens (%.1f MiB each)",
                 path.name, self.device, self.dtype, self.kv_cache.shape[0], self.kv_dtype,
                 config.block_size, self.block_nbytes / 2**20)

    # ------------------------------------------------------------------ setup
    @property
    def _mtp(self) -> bool:
        spec = self.config.speculative_config
        return spec is not None and spec.method == "mtp"

    def _build_model(self, hf_config: dict, weights) -> torch.nn.Module:
        cls = model_class(hf_config)
        kwargs = {}
        if self._mtp:
            if not getattr(cls, "supports_mtp", False):
                raise ValueError(f"speculative_config method 'mtp' needs a DeepSeek-V3/R1 checkpoint "
                                 f"with an MTP layer; {cls.__name__} has none (use 'ngram')")
            kwargs["mtp"] = True
        init_tensor_parallel(self.config.tp_rank, self.config.tp_size, self.device,
                             self.config.tp_timeout_s)
        # Tensors are allocated uninitialized, on the device and in the serving dtype (float32-only
        # tensors such as DeepSeek's router bias say so): load_weights fills and checks every one,
        # so random init and a float32 copy of a large model would be wasted.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = cls(hf_config, **kwargs)
        finally:
            torch.set_default_dtype(previous)
        model.load_weights(weights)
        return model.eval()

    def _allocate_kv_cache(self) -> torch.Tensor:
        shape_tail = (self.model.num_layers, self.config.block_size, *self.model.kv_token_shape)
        per_block = torch.Size(shape_tail).numel() * self.kv_dtype.itemsize
        n = self.config.num_kv_blocks or int(self.config.kv_cache_gib * 2**30 // per_block)
        if n < 2:
            raise ValueError(f"kv cache too small: one block needs {per_block} bytes")
        self.block_nbytes = per_block
        shape = (n, *shape_tail)
        if self.config.kv_allocator is None:
            return torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        nbytes = n * per_block
        storage = self.config.kv_allocator(nbytes)
        if (storage.dtype != torch.uint8 or storage.dim() != 1 or storage.numel() < nbytes
                or storage.device.type != self.device.type):
            raise ValueError(f"kv_allocator returned {storage.dtype} {tuple(storage.shape)} on "
                             f"{storage.device}; need uint8 of {nbytes} bytes on {self.device}")
        return storage[:nbytes].view(self.kv_dtype).view(shape)

    @property
    def grammar(self) -> GrammarCompiler:
        """Compiles structured-output constraints for this tokenizer (built on first use)."""
        if self._grammar is None:
            # TP ranks schedule in lockstep: a background compile could end on one rank's step
            # and another's next, so theirs compile in the step
            self._grammar = GrammarCompiler(self.tokenizer.hf, self.hf_config["vocab_size"],
                                            sorted(self.eos_token_ids),
                                            background=self.config.tp_size == 1)
        return self._grammar

    def set_kv_connector(self, connector: KVConnector | None) -> None:
        """Attach the store that KV handoffs and the shared prefix cache go through."""
        self.kv.connector = connector

    # ------------------------------------------------------------------ requests
    def add_request(self, request_id: str, prompt: str | None = None,
                    params: SamplingParams | None = None,
                    prompt_token_ids: list[int] | None = None, *,
                    kv_export: bool = False, kv_import: KVHandoff | None = None,
                    generated_token_ids: list[int] | None = None) -> None:
        """Queue a request. kv_export: prefill only — stop after the first token and hand the
        prompt's KV off (finish_reason "handoff", `kv_handoff` on the output). kv_import: continue
        a request a prefill engine started (its prompt, first token and KV blocks).
        generated_token_ids: tokens the client already has (e.g. from a decode worker that died);
        the engine continues after them without emitting them again."""
        params = params or SamplingParams()
        if request_id in self._seqs or request_id in self._compiling:
            raise ValueError(f"request id {request_id!r} is already running")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("either prompt or prompt_token_ids is required")
            prompt_token_ids = self.tokenizer.encode(prompt)
        ids = self.validate_prompt(prompt_token_ids, params, kv_export=kv_export)
        max_tokens = params.max_tokens or self.max_model_len - len(ids)
        seq = Sequence(request_id, ids, params, 1 if kv_export else max_tokens)
        seq.kv_export = kv_export
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop,
                                       params.include_stop_str_in_output, params.skip_special_tokens,
                                       params.min_tokens)
        resumed = list(generated_token_ids or ())
        if kv_import is not None:
            if list(kv_import.token_ids) != ids:
                raise ValueError("kv_import does not belong to this prompt")
            # the first token was sampled (and streamed) by the prefill engine
            resumed = resumed or [kv_import.first_token]
            if resumed[0] != kv_import.first_token:
                raise ValueError("generated_token_ids must start with the handoff's first token")
            seq.kv_import = kv_import
        if resumed:
            if len(resumed) >= seq.max_tokens or len(ids) + len(resumed) >= self.max_model_len:
                raise ValueError("the request has already generated all its tokens")
            self.validate_prompt(ids + resumed, SamplingParams(max_tokens=None))
        constraint = params.structured_output
        if constraint is not None and (compiling := self.grammar.compiling(constraint)) is not None:
            # its grammar compiles beside the steps; it is scheduled once that is done
            self._compiling[request_id] = _Compiling(compiling, seq, detok, resumed)
            return
        self._enqueue(seq, detok, resumed)

    def _enqueue(self, seq: Sequence, detok: IncrementalDetokenizer, resumed: list[int],
                 compiled: futures.Future | None = None) -> None:
        """Give the sequence its grammar's matcher (from `compiled`, its background compile, if it
        had one), if it has a grammar, and queue it."""
        if seq.params.structured_output is not None:
            seq.matcher = self.grammar.matcher(seq.params.structured_output, compiled)
            if not all(seq.matcher.accept(t) for t in resumed):
                raise ValueError("generated_token_ids do not fit the request's structured output")
        if resumed:
            seq.token_ids += resumed
            detok.push(resumed)
            detok.take(final=False)
        self._seqs[seq.request_id] = seq
        self._detok[seq.request_id] = detok
        self.scheduler.add(seq)

    def _collect_compiled(self) -> list[RequestOutput]:
        """Requests whose grammars are compiled join the queue; one whose grammar failed ends with
        an error output."""
        outputs = []
        for request_id, c in list(self._compiling.items()):
            if not c.compiled.done():
                continue
            del self._compiling[request_id]
            try:
                self._enqueue(c.seq, c.detok, c.resumed, c.compiled)
            except Exception as exc:  # noqa: BLE001 - xgrammar's own errors too: this request's, not the batch's
                outputs.append(RequestOutput(
                    request_id=request_id, new_token_ids=[], delta_text="", finished=True,
                    finish_reason="error", num_prompt_tokens=c.seq.num_prompt_tokens,
                    num_output_tokens=0, num_cached_tokens=0, logprobs=[], error=str(exc)))
        return outputs

    def validate_prompt(self, ids: list[int], params: SamplingParams, kv_export: bool = False) -> list[int]:
        """Checks a request fits this engine (with `kv_export`, a prefill engine's: it holds the
        prompt and the first token only); raises ValueError with a user-facing message."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.hf_config["vocab_size"]
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt is {len(ids)} tokens; this model's context is "
                             f"{self.max_model_len} tokens")
        total = len(ids) + (params.max_tokens or 0)
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds the context of {self.max_model_len} tokens")
        held = len(ids) + 1 if kv_export else max(total, len(ids) + 1)
        if self.block_manager.blocks_needed(held) > self.block_manager.num_blocks:
            raise ValueError("the request needs more KV cache than this worker has")
        if params.logit_bias and not all(0 <= t < vocab for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        return ids

    def decode_batch(self) -> int:
        """Sequences the next step decodes; 0 when it may compute prompt tokens."""
        return self.scheduler.decode_batch()

    def set_threads(self, threads: int) -> None:
        """Step on `threads` threads from the next step on (from the thread that steps it)."""
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False if it is unknown or already finished."""
        compiling = self._compiling.pop(request_id, None)
        if compiling is not None:   # it holds no blocks yet; its compile stops unless another waits
            if not any(c.compiled is compiling.compiled for c in self._compiling.values()):
                self.grammar.forget(compiling.seq.params.structured_output)
            return True
        seq = self._seqs.pop(request_id, None)
        self._detok.pop(request_id, None)
        self._saved_outputs.pop(request_id, None)
        if seq is None:
            return False
        moving = self.transfers.of(seq) if self.transfers is not None else None
        if moving is not None:  # its blocks are freed once the transfer thread is done with them
            moving.cancelled = True
        else:
            self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._compiling)

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        outputs = self._collect_compiled() if self._compiling else []
        if self.transfers is not None:
            outputs += self._collect_transfers()
        if self.drafter is not None:
            self._draft()
        sched = self.scheduler.schedule()
        self._preemptions += len(sched.preempted)
        if not sched.scheduled:
            # only KV in flight, or grammars compiling: wait for one to end (at most IDLE_WAIT_S),
            # do not spin
            if outputs:
                pass
            elif self.transfers is not None and self.transfers.pending():
                self.transfers.wait(IDLE_WAIT_S)
            elif self._compiling:
                futures.wait([c.compiled for c in self._compiling.values()], IDLE_WAIT_S,
                             return_when=futures.FIRST_COMPLETED)
            return outputs
        prompt = sum(max(0, min(s.num_tokens, s.seq.num_prompt_tokens - s.seq.num_computed_tokens))
                     for s in sched.scheduled)
        started = time.perf_counter()
        sampled, tokens, logprobs = self.runner.run(sched.scheduled)
        elapsed = time.perf_counter() - started
        self._step_time.observe(elapsed)
        self._step_thread_seconds += elapsed * self.threads
        if prompt:
            self._prefill_tokens += prompt
            self._prefill_seconds += elapsed
        if isinstance(self.drafter, MtpDrafter):   # its KV for what this step commits
            self.drafter.catch_up(self.runner.last_order, self.runner.last_hidden, sampled, tokens)
        sampled_ids = {id(s) for s in sampled}
        for s in sched.scheduled:
            # drafts' KV counts once they are accepted, below
            committed = s.num_tokens - len(s.seq.draft_token_ids)
            s.seq.num_computed_tokens += committed
            self._computed_tokens += committed
            if id(s) not in sampled_ids:
                self.block_manager.commit(s.seq)
        for s, new, lps in zip(sampled, tokens, logprobs):
            seq = s.seq
            drafted, accepted = len(seq.draft_token_ids), len(new) - 1
            if drafted:
                seq.draft_token_ids = []
                seq.draft_state.record(drafted, accepted)
                self._draft_tokens += drafted
                self._accepted_tokens += accepted
                self._verifications += 1
                # accepted drafts' KV stays; the rejected ones' blocks go back to the pool
                seq.num_computed_tokens += accepted
                self._computed_tokens += accepted
                self.block_manager.trim(seq, seq.num_computed_tokens + 1)
            out = self._append_tokens(seq, new, lps)
            if out is not None:
                outputs.append(out)
        if self.transfers is not None and self.transfers.saving():
            self.transfers.settle_saves(min(SAVE_GRACE_MAX_S, SAVE_GRACE_SHARE * elapsed))
            outputs += self._collect_transfers()
        return outputs

    def _draft(self) -> None:
        """Give each running sequence that is decoding its draft tokens for this step."""
        k = self.config.speculative_config.num_speculative_tokens
        requests = []
        for seq in self.scheduler.running:
            seq.draft_token_ids = []
            if seq.num_computed_tokens != seq.num_tokens - 1 or seq.params.processes_logits:
                # still prefilling (or its KV is being imported); or its next token depends on
                # the tokens before it beyond the model's logits (a grammar, penalties)
                continue
            # the last token verified must still be one the request may emit
            room = min(seq.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
            if room > 0:
                n = min(room, seq.draft_state.num_drafts(k))
                if n > 0:
                    requests.append((seq, n))
        if requests:
            # the MTP drafter may take blocks for its own KV while each running sequence keeps one
            self.drafter.draft(requests, keep_free=len(self.scheduler.running))

    def _start_import(self, seq: Sequence) -> bool:
        """Scheduler hook: start pulling a just-admitted sequence's blocks from the store; True when
        it must wait for them (it joins the batch once they are in)."""
        load = self.kv.plan_import(seq)
        if load is None:
            return False
        self.transfers.submit(load)
        return True

    def _collect_transfers(self) -> list[RequestOutput]:
        """Finished transfers: loaded sequences join the batch, saved prompts release their first
        token with the handoff; a cancelled request's blocks are freed now."""
        outputs = []
        for t in self.transfers.collect():
            seq = t.job.seq
            if isinstance(t.job, KVLoad):
                self.kv.finish_import(t.job)  # TP: the ranks agree on the good blocks
                self._kv_wait.observe(time.perf_counter() - t.started)
                if t.cancelled:
                    self.scheduler.finish(seq, "abort")
                else:
                    self.scheduler.kv_arrived(seq)
                continue
            handoff = self.kv.finish_save(t.job)  # TP: gathers every rank's refs
            self.scheduler.finish(seq, "abort" if t.cancelled else "handoff")
            if not t.cancelled:
                del self._seqs[seq.request_id], self._detok[seq.request_id]
                outputs.append(replace(self._saved_outputs.pop(seq.request_id), kv_handoff=handoff))
        return outputs

    def _append_tokens(self, seq: Sequence, tokens: list[int],
                       logprobs: list[TokenLogprob | None]) -> RequestOutput | None:
        """Append a step's new tokens up to the first that finishes the request."""
        if seq.num_output_tokens == 0:
            self._prefix_hits += seq.num_cached_tokens
        detok = self._detok[seq.request_id]
        p = seq.params
        reason = error = None
        emitted: list[int] = []
        for token in tokens:
            if seq.matcher is not None and not seq.matcher.accept(token):
                # the grammar dead-ended: this request ends, the batch goes on
                reason, error = "error", f"structured output failed: {seq.matcher.failed}"
                break
            seq.token_ids.append(token)
            emitted.append(token)
            # a finished grammar stops on its stop token even under ignore_eos
            if ((token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids
                    or (seq.matcher is not None and seq.matcher.is_terminated)):
                reason = "stop"
            elif detok.push([token]):
                reason = "stop"
            elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "handoff" if seq.kv_export else "length"
            if reason is not None:
                break
        # A stop among accepted drafts leaves KV past the last token kept; the blocks now full are
        # registered for the prefix cache before a finished sequence gives them back.
        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens)
        self.block_manager.commit(seq)
        out = RequestOutput(
            request_id=seq.request_id, new_token_ids=emitted,
            delta_text=detok.take(final=reason not in (None, "handoff")),
            finished=reason is not None, finish_reason=reason,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=[lp for lp in logprobs[:len(emitted)] if lp], error=error)
        if reason == "handoff" and self.transfers is not None:
            # The first token goes out with the handoff, once the prompt's blocks are stored.
            self.scheduler.hold(seq)
            self._saved_outputs[seq.request_id] = out
            self.transfers.submit(self.kv.plan_save(seq))
            return None
        if reason == "handoff":
            out = replace(out, kv_handoff=self.kv.export(seq))
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self._seqs[seq.request_id], self._detok[seq.request_id]
        return out

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self._compiling),
            num_free_blocks=bm.num_free_blocks, num_total_blocks=bm.num_blocks,
            block_size=bm.block_size, computed_tokens_total=self._computed_tokens,
            prefix_hit_tokens_total=self._prefix_hits, preemptions_total=self._preemptions,
            spec_draft_tokens_total=self._draft_tokens, spec_accepted_tokens_total=self._accepted_tokens,
            spec_verifications_total=self._verifications,
            prefill_tokens_total=self._prefill_tokens, prefill_seconds_total=self._prefill_seconds,
            num_loading_kv=len(self.scheduler.loading), step_seconds=self._step_time.snapshot(),
            step_thread_seconds_total=self._step_thread_seconds,
            kv_wait_seconds=self._kv_wait.snapshot(), **asdict(self.kv.counters))


def _fingerprint(path, hf_config: dict, dtype: torch.dtype, kv_dtype: torch.dtype) -> str:
    """Identifies the model whose KV is in a block: config + dtype (and the cache's, where it is
    another) + the weights' contents (sampled, see `content_digest`), so a fine-tune at the same path
    with the same shapes differs, and a float16 cache's blocks are not another cache's."""
    h = hashlib.sha256(json.dumps(hf_config, sort_keys=True, default=str).encode())
    h.update(content_digest(path).encode())
    h.update(str(dtype).encode())
    if kv_dtype != dtype:
        h.update(f"kv {kv_dtype}".encode())
    return h.hexdigest()[:16]
