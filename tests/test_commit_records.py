"""Commit records are authenticated with the deployment's key: a block plus a record naming its CRC,
written by anyone else (another deployment, or a pod that reaches the store), is not used as a prefix."""
from __future__ import annotations

import zlib

from pdcluster.cluster.kvstore.connector import MooncakeConnector, commit_key


class DictStore:
    """The few store calls commit records use, over a dict."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def register_cache(self, cache) -> None:
        pass

    def put_values(self, keys, values, replace: bool = False) -> None:
        for k, v in zip(keys, values):
            if replace or k not in self.values:
                self.values[k] = bytes(v)

    def exists(self, keys) -> list[bool]:
        return [k in self.values for k in keys]

    def get_values(self, keys) -> list[bytes | None]:
        return [self.values.get(k) for k in keys]


def test_only_records_written_with_this_deployments_key_are_used():
    store = DictStore()
    ours = MooncakeConnector(store, cache=None, secret=b"k" * 32)
    keys = ["pdkv/a", "pdkv/b", "pdkv/c"]
    ours.commit(keys[:2], [11, 22])
    ours.flush()
    assert ours.committed(keys) == [11, 22, None]

    # Someone with store access writes block c and a record naming its true CRC: a bare CRC (no
    # MAC), then one MACed under another key (another deployment's record).
    crc = zlib.crc32(b"poisoned KV")
    store.values[commit_key("pdkv/c")] = crc.to_bytes(4, "little")
    assert ours.committed(keys) == [11, 22, None]
    del store.values[commit_key("pdkv/c")]
    theirs = MooncakeConnector(store, cache=None, secret=b"x" * 32)
    theirs.commit(["pdkv/c"], [crc])
    theirs.flush()
    assert theirs.committed(["pdkv/c"]) == [crc]  # valid for its writer only
    assert ours.committed(keys) == [11, 22, None]
    # A record of ours copied to another block's key does not vouch for that block either.
    store.values[commit_key("pdkv/c")] = store.values[commit_key("pdkv/a")]
    assert ours.committed(keys) == [11, 22, None]
    for c in (ours, theirs):
        c.flush()
