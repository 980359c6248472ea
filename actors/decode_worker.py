"""Decode worker actor: continues requests a prefill worker started and streams their tokens back,
one long-lived output stream per ingress replica carrying each engine step's outputs of all that
replica's requests here. One per decode node (placed by the pool's role resource).
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence

import ray

from ..cluster.kvstore.manifest import ManifestError, decode_handoff
from ..engine.sampling import SamplingParams
from .output_mailbox import Batch, OutputMailbox
from .worker import EngineWorker

log = logging.getLogger(__name__)

# An owner whose entries nobody has read for this long is gone (its replica died, its stream with
# it): its requests are aborted and its mailbox dropped. A live replica reads within milliseconds.
UNREAD_TTL_S = 60.0


class HandoffRefused(RuntimeError):
    """The prefill side's handoff cannot be read here (another manifest version, another model)."""


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(self, spec: dict, worker_id: str) -> None:
        super().__init__(spec, worker_id)
        self.mailboxes: dict[str, OutputMailbox] = {}  # ingress replica -> its unread outputs

    async def start(self, owner: str, request_id: str, params: SamplingParams, handoff: bytes | None,
                    prompt_token_ids: Sequence[int] = (), streamed_token_ids: Sequence[int] = (),
                    ) -> None:
        """Continue a request for ingress replica `owner`, whose `outputs` stream carries its results:
        RequestOutputs until the finished one, or an exception (a ValueError for a request the
        engine refuses, RequestAborted once aborted, HandoffRefused). Disaggregated: `handoff`
        (kv.proto bytes from the prefill worker) carries the prompt, its first token and where its
        KV is. Colocated: `handoff` is None and this worker computes `prompt_token_ids` itself.
        `streamed_token_ids`: tokens the client already has beyond those (after a failover), which
        this worker continues after. abort() frees the request's blocks."""
        self._drop_unread()
        mailbox = self._mailbox(owner)
        sink = mailbox.sink(request_id)
        generated = list(streamed_token_ids)
        try:
            kv_import = None
            if handoff is not None:
                try:
                    kv_import = decode_handoff(handoff)
                except ManifestError as exc:
                    raise HandoffRefused(f"the KV handoff cannot be read here: {exc}") from None
                prompt_token_ids = kv_import.token_ids
                generated.insert(0, kv_import.first_token)
            self.loop.submit(request_id, list(prompt_token_ids), params, sink, kv_import=kv_import,
                             generated_token_ids=generated)
        except Exception as exc:  # noqa: BLE001 - the request's own error, told on its stream
            sink(exc)

    @ray.method(num_returns="streaming")
    async def outputs(self, owner: str) -> AsyncIterator[Batch]:
        """`owner`'s stream: whenever any of its requests here has new results, everything pending
        as one message, {request_id: [RequestOutput or exception, ...]} (several engine steps merged
        when the reader fell behind). Results produced before it opened wait for it. It runs until a
        newer stream for `owner` replaces it."""
        mailbox = self._mailbox(owner)
        reader = mailbox.attach()
        while (batch := await mailbox.take(reader)) is not None:
            yield batch

    def _mailbox(self, owner: str) -> OutputMailbox:
        mailbox = self.mailboxes.get(owner)
        if mailbox is None:
            mailbox = self.mailboxes[owner] = OutputMailbox()
        return mailbox

    def _drop_unread(self) -> None:
        """Abort the requests of owners that stopped reading, and drop their mailboxes."""
        now = time.monotonic()
        for owner, mailbox in list(self.mailboxes.items()):
            if mailbox.unread_since is not None and now - mailbox.unread_since > UNREAD_TTL_S:
                log.warning("ingress %s stopped reading its outputs: aborting its %d request(s)",
                            owner, len(mailbox.requests))
                for request_id in list(mailbox.requests):
                    self.loop.abort(request_id)
                mailbox.close()
                del self.mailboxes[owner]
