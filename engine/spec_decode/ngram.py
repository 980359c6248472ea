"""N-gram (prompt lookup) drafter: propose the tokens that followed the latest earlier occurrence
of the sequence's own longest suffix n-gram. No model, so it is free when it finds nothing."""
from __future__ import annotations

import numpy as np


class NgramDrafter:
    def __init__(self, prompt_lookup_max: int, prompt_lookup_min: int) -> None:
        self.max_n = prompt_lookup_max
        self.min_n = prompt_lookup_min

    def propose(self, token_ids: list[int] | np.ndarray, k: int) -> list[int]:
        """Up to k tokens that followed the longest suffix n-gram (max_n down to min_n tokens)
        earlier in `token_ids`; [] when no suffix of at least min_n tokens occurs earlier."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        length = len(tokens)
        if k < 1 or length <= self.min_n:
            return []
        # Candidates are end positions j < length-1 of an earlier occurrence; each round keeps those
        # whose match also extends one token further back, so round n leaves the n-gram matches.
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        best = None
        for n in range(1, min(self.max_n, length - 1) + 1):
            if n > 1:
                ends = ends[ends >= n - 1]
                ends = ends[tokens[ends - (n - 1)] == tokens[length - n]]
            if ends.size == 0:
                break
            if n >= self.min_n:
                best = ends
        if best is None:
            return []
        # The latest occurrence follows the most recent context (a copy in progress, a loop).
        start = int(best[-1]) + 1
        return tokens[start:start + k].tolist()
