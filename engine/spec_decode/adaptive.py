"""Per-sequence draft length: draft fewer tokens, then none for a while, when drafts keep failing,
so text the drafter cannot predict decodes at (almost) the speed of plain decoding."""
from __future__ import annotations

from dataclasses import dataclass

# weight of the latest verification in the moving average of the acceptance rate
EMA_WEIGHT = 0.5
# below this average acceptance the sequence stops drafting for a while
PAUSE_BELOW = 0.15
# decode steps without drafts after the first pause; doubled by each pause that follows another
# without an accepted draft in between, up to MAX_PAUSE
FIRST_PAUSE = 4
MAX_PAUSE = 64
# the average a paused sequence restarts from: low, so it probes with one token before drafting k
RESTART_RATE = 0.25


@dataclass
class DraftState:
    """How well one sequence's drafts have been doing."""
    rate: float = 1.0          # moving average of accepted / drafted tokens per verification
    paused: int = 0            # decode steps left without drafting
    next_pause: int = FIRST_PAUSE

    def num_drafts(self, k: int) -> int:
        """How many tokens to draft this step (at most k); counts down a pause."""
        if self.paused:
            self.paused -= 1
            return 0
        # a draft of n tokens pays for n extra positions; draft about as many as are accepted
        return max(1, min(k, int(self.rate * k + 0.5)))

    def record(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.rate += EMA_WEIGHT * (accepted / drafted - self.rate)
        if accepted:
            self.next_pause = FIRST_PAUSE
        if self.rate < PAUSE_BELOW:
            self.paused = self.next_pause
            self.next_pause = min(2 * self.next_pause, MAX_PAUSE)
            self.rate = RESTART_RATE
