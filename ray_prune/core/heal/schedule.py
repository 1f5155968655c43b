"""What a healing step trains on and at which learning rate: both pure functions of the step.

Being pure is what makes resuming exact: a run restarted at step s replays the
learning rates and the sample order of an uninterrupted one from s on.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak, then cosine decay to 0.

    Unlike HF's cosine schedule the warmup starts at lr/warmup, not 0, so the
    first step is not wasted (with warmup_steps=1 it trains at full lr).
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


class SampleOrder:
    """Block indices as a pure function of (seed, position): a fresh permutation per pass over the blocks."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        out = torch.empty(count, dtype=torch.long)
        for k in range(count):
            epoch, pos = divmod(start + k, self.n)
            out[k] = self._perm_of(epoch)[pos]
        return out
