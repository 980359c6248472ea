"""The engine's `KVConnector` over the Mooncake store: zero-copy block moves by chain-hash key.

`make_connector` is what workers call: it returns None (and the engine recomputes instead of
loading) when the store cannot be reached, so a dead master never stops serving.
"""
from __future__ import annotations

import logging

from pdcluster.cluster.kv_store import (BlockMissing, KVStoreError, MooncakeBackend, StoreConfig,
                                        block_spans)
from pdcluster.engine.kv_transfer import KVConnector

log = logging.getLogger(__name__)


class MooncakeConnector(KVConnector):
    def __init__(self, backend: MooncakeBackend, cache) -> None:
        self.backend = backend
        self.cache = cache
        backend.register_cache(cache)

    def save(self, keys: list[str], block_ids: list[int]) -> list[bool]:
        ptrs, sizes = block_spans(self.cache, block_ids)
        try:
            self.backend.put_blocks(keys, ptrs, sizes)
        except KVStoreError as exc:
            log.warning("store put of %d blocks failed: %s", len(keys), exc)
            return [False] * len(keys)
        return [True] * len(keys)

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

    def exists(self, keys: list[str]) -> list[bool]:
        try:
            return self.backend.exists(keys)
        except KVStoreError as exc:
            log.warning("store lookup failed: %s", exc)
            return [False] * len(keys)

    def close(self) -> None:
        self.backend.close()


def store_config(store_spec, local_hostname: str = "127.0.0.1",
                 gcs_address: str | None = None) -> StoreConfig:
    """StoreConfig for one client from the cluster spec's `store` section."""
    return StoreConfig(
        master_server_addr=store_spec.master_address(gcs_address),
        metadata_server=store_spec.metadata_url(gcs_address),
        local_hostname=local_hostname, protocol=store_spec.protocol,
        device_name=store_spec.device_name,
        global_segment_size=store_spec.global_segment_mib << 20,
        local_buffer_size=store_spec.local_buffer_mib << 20)


def make_connector(store_spec, engine, local_hostname: str = "127.0.0.1",
                   gcs_address: str | None = None) -> MooncakeConnector | None:
    """Connect `engine` to the store and attach the connector; None if the store is unreachable."""
    try:
        backend = MooncakeBackend(store_config(store_spec, local_hostname, gcs_address))
        connector = MooncakeConnector(backend, engine.kv_cache)
    except (KVStoreError, OSError, ValueError) as exc:
        log.warning("KV store unavailable (%s): decode will recompute prompts", exc)
        return None
    engine.set_kv_connector(connector)
    return connector
