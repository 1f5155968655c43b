"""Run a model's decoder blocks one at a time, in any selection, with the arguments its decoder gives them.

A block needs more than the stream: attention masks, position embeddings (one
per layer type in Gemma-3), position ids. None of them depends on the stream,
so one decoder pass per batch in which every block is a stand-in that returns
its input (``profile_streamed``'s recorder: no block runs) records them with
x^0, and any chain of blocks can then run from any stream. Calls are recorded
for the model as it is, by layer index.

Replaying a subset of blocks computes what ``prune.prune_layers`` makes of the
model: pruning keeps each kept block's entry of per-layer config lists (Gemma's
``layer_types``, Qwen2's sliding-window layers), so a kept block gets the mask
and rotary embedding of its own type, as recorded; the ``layer_idx`` that
pruning renumbers indexes only the KV cache, which is off here.

Blocks are called as ``loss.next_token_loss`` calls the model: packed blocks, no
padding, positions 0..T-1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ray_prune.core.architecture import decoder, decoder_layers
from ray_prune.core.profile import block_output, embedding_device
from ray_prune.core.profile_streamed import _record


class Replay:
    """One batch of token blocks: its ids, x^0, and the recorded call of every block."""

    def __init__(self, ids: torch.Tensor, x0: torch.Tensor, calls: list) -> None:
        self.ids, self.x0, self.calls = ids, x0, calls

    def run(self, layers: nn.ModuleList, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``index`` on ``hidden``, called as the decoder called it."""
        args, kwargs = self.calls[index]
        return block_output(layers[index](hidden, *args, **kwargs))

    def through(self, layers: nn.ModuleList, indices: Sequence[int],
                hidden: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The stream entering each of the blocks ``indices``, run in turn from ``hidden`` (default x^0), and the
        last one's output."""
        states = []
        hidden = self.x0 if hidden is None else hidden
        for j in indices:
            states.append(hidden)
            hidden = self.run(layers, j, hidden)
        return states, hidden


def record(model: nn.Module, blocks: torch.Tensor, batch_size: int) -> list[Replay]:
    """A :class:`Replay` of each batch of ``blocks`` (num_blocks, seq_len), from one decoder pass per batch in which
    no block runs. Call it under ``torch.no_grad`` or ``torch.inference_mode``, as the replays will run."""
    layers, body = decoder_layers(model), decoder(model)
    device = embedding_device(model)  # a model split across devices takes its ids where the embedding runs
    out = []
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start:start + batch_size].to(device)
        (x0,), calls = _record(body, layers, [(ids, torch.ones_like(ids))])
        out.append(Replay(ids, x0, [c[0] for c in calls]))
    return out
