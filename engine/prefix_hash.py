"""Chain hashes of full KV blocks: identical prefixes (same model, same TP rank) get identical keys.

h_i = sha256(h_{i-1} || salt || int32-LE(token ids of block i)); only full blocks are hashed. The same
keys name blocks in the engine's prefix cache, in the Mooncake store, and in the router's affinity.
Stdlib only, so the control plane can import it without torch.
"""
from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

# array('i') is the native int32; every platform we run on is little-endian (x86-64, aarch64).
_INT32 = "i"


def block_hashes(token_ids: Sequence[int], block_size: int, salt: bytes = b"",
                 parent: bytes = b"", start: int = 0) -> list[bytes]:
    """Hashes of the full blocks of `token_ids` from block index `start` on, chained from `parent`
    (the hash of block start-1, or b"" when start == 0)."""
    out: list[bytes] = []
    prev = parent
    for b in range(start, len(token_ids) // block_size):
        chunk = array(_INT32, token_ids[b * block_size:(b + 1) * block_size]).tobytes()
        prev = hashlib.sha256(prev + salt + chunk).digest()
        out.append(prev)
    return out


def model_salt(model_fingerprint: str, tp_rank: int = 0, deployment_id: str = "") -> bytes:
    """The salt of one engine's block hashes: its model, its TP rank and its deployment."""
    deployment = f"{deployment_id}/" if deployment_id else ""
    return f"{deployment}{model_fingerprint}/tp{tp_rank}/".encode()
