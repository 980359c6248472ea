"""The engine's `KVConnector` over the Mooncake store: zero-copy block moves by chain-hash key."""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor

from ...engine.kv_connector import KVConnector
from .backend import BlockMissing, KVStoreError, StoreConfig, block_spans
from .mooncake_client import MooncakeBackend

# `make_connector` is what workers call: it returns None (and the engine recomputes instead of
# loading) when the store cannot be reached, so a dead master never stops serving. In the store's
# `node` mode the client is opened first (`open_backend`) and the engine's KV cache allocated from it
# (`EngineConfig.kv_allocator=backend.allocate`), then handed to `make_connector`.

log = logging.getLogger(__name__)

# The per-deployment key that authenticates commit records (hex), set by the controller in every
# worker's runtime env. Anyone who can write to the store can write a block and a record naming its
# CRC (a CRC is no MAC): without the key such a record is ignored and the prefix computed afresh.
COMMIT_SECRET_ENV = "PDCLUSTER_COMMIT_SECRET"
_CRC, _MAC = 4, 16  # a record: CRC-32 of the block (little-endian), then its truncated HMAC-SHA256


# This deployment's id (hex), set by the controller next to the commit key: it salts every block
# hash, so the store's keys (and the router's prefix affinity) are per deployment. A store that
# outlives a redeploy then never serves the old deployment's KV (nor holds keys whose records only
# the old key authenticates, which would leave those prefixes uncacheable).
DEPLOYMENT_ID_ENV = "PDCLUSTER_DEPLOYMENT_ID"


def deployment_id() -> str:
    """This worker's deployment id ("" outside a deployment)."""
    return os.environ.get(DEPLOYMENT_ID_ENV, "")


def commit_key(key: str) -> str:
    """Where a block's commit record (its CRC-32 and that CRC's MAC) is stored."""
    return key + "/commit"


def commit_secret() -> bytes:
    """This deployment's commit-record key, from the environment (b"" outside a deployment: records
    are then checked for shape only, which tests and the single-process tools accept)."""
    return bytes.fromhex(os.environ.get(COMMIT_SECRET_ENV, ""))


def _mac(secret: bytes, record_key: str, crc: bytes) -> bytes:
    return hmac.new(secret, record_key.encode() + crc, hashlib.sha256).digest()[:_MAC]


class MooncakeConnector(KVConnector):
    """Commit records are written on a background thread once a save's blocks are in the store (or a
    load has verified them): the handoff does not wait for them (its manifest carries the
    checksums); only a later request's prefix lookup needs them, and until they land it misses and
    computes."""

    def __init__(self, backend: MooncakeBackend, cache, secret: bytes | None = None) -> None:
        self.backend = backend
        self.cache = cache
        self.secret = commit_secret() if secret is None else secret
        backend.register_cache(cache)
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-commit")
        self._last_commit: Future | None = None

    def save(self, keys: list[str], block_ids: list[int], checksums: list[int | None]) -> list[bool]:
        ptrs, sizes = block_spans(self.cache, block_ids)
        try:
            stored = self.backend.put_blocks(keys, ptrs, sizes)
        except KVStoreError as exc:
            log.warning("store put of %d blocks failed: %s", len(keys), exc)
            return [False] * len(keys)
        # Commit only what this call stored: a block that was already there keeps the record its
        # writer gave it, which describes the bytes it holds (the same tokens computed in another
        # batch can differ in the last bits).
        self._submit([k for k, s in zip(keys, stored) if s],
                     [c for c, s in zip(checksums, stored) if s], replace=True)
        return [True] * len(keys)

    def commit(self, keys: list[str], checksums: list[int]) -> None:
        self._submit(keys, checksums, replace=False)  # a record already there stays

    def _submit(self, keys: list[str], checksums: list[int | None], replace: bool) -> None:
        records = [self._record(k, c) for k, c in zip(keys, checksums) if c is not None]
        if records:
            self._last_commit = self._committer.submit(self._commit, records, replace)

    def _record(self, key: str, checksum: int) -> tuple[str, bytes]:
        record_key, crc = commit_key(key), checksum.to_bytes(_CRC, "little")
        return record_key, crc + _mac(self.secret, record_key, crc)

    def _verified(self, record_key: str, value: bytes | None) -> int | None:
        """The CRC a record names, if this deployment's key wrote it."""
        if value is None or len(value) != _CRC + _MAC:
            return None
        crc, mac = value[:_CRC], value[_CRC:]
        if not hmac.compare_digest(mac, _mac(self.secret, record_key, crc)):
            log.warning("commit record %s is not this deployment's: ignored", record_key)
            return None
        return int.from_bytes(crc, "little")

    def _commit(self, records: list[tuple[str, bytes]], replace: bool) -> None:
        keys, values = zip(*records)
        try:
            self.backend.put_values(keys, values, replace=replace)
        except Exception as exc:  # noqa: BLE001 - nobody waits on it: the prefix cache just misses
            log.warning("committing %d stored blocks failed: %s", len(records), exc)

    def flush(self) -> None:
        """Wait until the commit records of every save so far are written (or have failed)."""
        if (last := self._last_commit) is not None:
            last.result()  # one worker thread: the last submitted finishes last

    def load(self, keys: list[str], block_ids: list[int]) -> list[bool]:
        ptrs, sizes = block_spans(self.cache, block_ids)
        try:
            self.backend.get_blocks(keys, ptrs, sizes)
        except BlockMissing as exc:
            missing = set(exc.missing)
            return [k not in missing for k in keys]
        except KVStoreError as exc:
            log.warning("store get of %d blocks failed: %s", len(keys), exc)
            return [False] * len(keys)
        return [True] * len(keys)

    def committed(self, keys: list[str]) -> list[int | None]:
        records = [commit_key(k) for k in keys]
        try:  # one cheap lookup first: most prompts find nothing, and only a leading run is used
            there = self.backend.exists(records)
            run = next((i for i, t in enumerate(there) if not t), len(there))
            values = self.backend.get_values(records[:run])
        except KVStoreError as exc:
            log.warning("store lookup failed: %s", exc)
            return [None] * len(keys)
        sums = [self._verified(r, v) for r, v in zip(records, values)]
        return sums + [None] * (len(keys) - len(sums))

    def close(self) -> None:
        self._committer.shutdown(wait=True, cancel_futures=True)  # records are best effort
        self.backend.close()


def store_config(store_spec, local_hostname: str = "127.0.0.1",
                 gcs_address: str | None = None) -> StoreConfig:
    """StoreConfig for one client from the cluster spec's `store` section. In node mode the node
    client listens on `local_hostname` too (actors/node_client.py starts it so)."""
    node = store_spec.client == "node"
    return StoreConfig(
        master_server_addr=store_spec.master_address(gcs_address),
        metadata_server=store_spec.metadata_url(gcs_address),
        local_hostname=local_hostname, protocol=store_spec.protocol,
        device_name=store_spec.device_name,
        global_segment_size=store_spec.global_segment_mib << 20,
        local_buffer_size=store_spec.local_buffer_mib << 20, client=store_spec.client,
        same_host_reads=store_spec.same_host_reads,
        node_client_address=f"{local_hostname}:{store_spec.node_client_port}" if node else "",
        node_segment=f"{local_hostname}:{store_spec.node_client_transfer_port}" if node else "")


def open_backend(store_spec, local_hostname: str = "127.0.0.1",
                 gcs_address: str | None = None) -> MooncakeBackend | None:
    """A store client for this process; None (logged) if the store cannot be reached."""
    try:
        return MooncakeBackend(store_config(store_spec, local_hostname, gcs_address))
    except (KVStoreError, OSError, ValueError) as exc:
        log.warning("KV store unavailable (%s): decode will recompute prompts", exc)
        return None


def make_connector(store_spec, engine, local_hostname: str = "127.0.0.1",
                   gcs_address: str | None = None,
                   backend: MooncakeBackend | None = None) -> MooncakeConnector | None:
    """Connect `engine` to the store (through `backend` when it was opened before the engine) and
    attach the connector; None if the store is unreachable."""
    backend = backend or open_backend(store_spec, local_hostname, gcs_address)
    if backend is None:
        return None
    try:
        connector = MooncakeConnector(backend, engine.kv_cache)
    except (KVStoreError, ValueError) as exc:
        log.warning("KV store unavailable (%s): decode will recompute prompts", exc)
        backend.close()
        return None
    engine.set_kv_connector(connector)
    return connector
