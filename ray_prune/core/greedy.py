"""SLEB's greedy layer removal (Song et al., 2024) as one removal order per model.

Each round removes the one layer whose removal raises the calibration loss
(the next-token cross-entropy of ``core.loss``, on packed calibration blocks,
a BOS never a target) least. The rounds only ever add a layer to what is
removed, so the first k layers of the order are the greedy choice for k
layers: one computation gives every fraction a sweep asks for
(``select.layers_to_remove("greedy", L, n, order=...)``).

Evaluating a candidate does not need a full forward pass. The stream entering
block p of the current model is the same for every candidate that removes
block p or a later one, so each round first runs the current model once,
keeping the stream entering each of its blocks, and a candidate then runs only
the blocks after the one it removes, the final norm and the LM head. A round of
K candidates costs one pass of the current model plus K(K-1)/2 block calls and
K heads, where removing each candidate and running the pruned model costs
K(K-1) block calls and K heads.

Blocks run outside the decoder's loop with the arguments it gives them
(``core.replay``), which computes what ``prune.prune_layers`` makes of the
model, Gemma-3's per-layer attention types included. The tests hold the order
and every prefix's loss to a loop that prunes a copy with ``prune_layers`` and
runs it whole, every candidate of every round.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ray_prune.core.architecture import decoder_layers, family_of
from ray_prune.core.loss import LOGITS_BUDGET
from ray_prune.core.packing import IGNORE, targets
from ray_prune.core.replay import record
from ray_prune.core.select import check_n
from ray_prune.errors import UserError

log = logging.getLogger(__name__)  # a line per round: a sweep forwards them to the driver, the CLI prints them


@dataclass
class GreedyOrder:
    """A greedy removal order and the calibration loss along it."""

    order: list[int]  # original layer indices, in the order they are removed
    losses: list[float]  # losses[k - 1]: mean calibration loss (nats) with order[:k] removed
    base_loss: float  # the unpruned model's calibration loss
    num_layers: int
    tokens: int  # targets each loss is the mean over
    seconds: float
    candidates: int  # candidate removals evaluated, over all rounds
    extra: dict = field(default_factory=dict)

    def prefix(self, n: int) -> list[int]:
        """The n layers to remove, sorted."""
        from ray_prune.core.select import greedy_prefix

        return greedy_prefix(self.order, n, self.num_layers)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GreedyOrder:
        return cls(**data)


def final_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """(final norm, LM head, logit soft-cap) of a CausalLM: what turns x^L into logits, as its forward does."""
    base = getattr(model, "get_base_model", lambda: model)()
    _, fam = family_of(base)
    cap = getattr(base.config, "final_logit_softcapping", None)  # Gemma-2/3: tanh soft-capping of the logits
    return base.get_submodule(fam.final_norm_path), base.get_output_embeddings(), cap


def stream_loss(model: nn.Module, stream: torch.Tensor, gold: torch.Tensor) -> float:
    """Summed next-token cross-entropy of the logits of ``stream`` (B, T, H), taken before the final norm,
    against ``gold`` (B, T-1) (IGNORE where nothing is scored). Only scored positions reach the head, in chunks
    of at most ``loss.LOGITS_BUDGET`` logits; the cross-entropy is in fp32, as ``loss.next_token_loss`` takes it."""
    norm, head, cap = final_head(model)
    scored = gold != IGNORE
    hidden = norm(stream)[:, :-1][scored]
    labels = gold[scored]
    step = max(1, LOGITS_BUDGET // int(model.config.vocab_size))
    total = 0.0
    for start in range(0, hidden.shape[0], step):
        logits = head(hidden[start:start + step])
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        gold_chunk = labels[start:start + step].to(logits.device)
        total += nn.functional.cross_entropy(logits.float(), gold_chunk, reduction="sum").item()
    return total


def check_blocks(blocks: torch.Tensor, batch_size: int) -> None:
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise UserError(f"expected (num_blocks, seq_len >= 2) token blocks, got shape {tuple(blocks.shape)}",
                        "pack calibration texts with ray_prune.core.packing.pack_texts")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}", "use batch_size >= 1")


@torch.inference_mode()
def greedy_order(
    model: nn.Module,
    blocks: torch.Tensor,
    bos: int | None = None,
    batch_size: int = 8,
    max_remove: int | None = None,
    progress: bool = False,
    model_id: str = "",
) -> GreedyOrder:
    """SLEB's greedy removal order of ``model`` on packed calibration ``blocks`` (num_blocks, seq_len).

    ``bos``: the token id never scored (``packing.scored_bos(tokenizer)``), as in every loss here. The order
    holds ``max_remove`` layers (default L - 1, every size); a sweep whose largest fraction removes n layers
    needs only n rounds, and the early rounds cost the most. The model is not changed.

    Cost, on the calibration tokens: a round with K layers left runs the current model once, K(K-1)/2 blocks and
    K LM heads (final norm, head, cross-entropy), the scored positions only; the head is the larger part where
    the vocabulary is large (Gemma-3-270M). Memory: x^0 and the recorded block arguments of every batch, and the
    K streams entering the current blocks of one batch at a time.
    """
    from tqdm.auto import tqdm

    check_blocks(blocks, batch_size)
    layers = decoder_layers(model)
    L = len(layers)
    rounds = L - 1 if max_remove is None else max_remove
    check_n(rounds, L)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        batches = record(model, blocks, batch_size)
        labels = targets(blocks, bos)[:, 1:]
        golds = [labels[k * batch_size:(k + 1) * batch_size].to(b.ids.device) for k, b in enumerate(batches)]
        tokens = sum(int((g != IGNORE).sum()) for g in golds)
        kept = list(range(L))
        order: list[int] = []
        losses: list[float] = []
        base_loss = float("nan")
        candidates = 0
        if rounds == 0:
            base_loss = sum(stream_loss(model, b.through(layers, kept)[1], g) for b, g in zip(batches, golds))
            base_loss /= tokens
        round_seconds: list[float] = []  # each round's time, so a caller can see what every size costs
        for _ in tqdm(range(rounds), desc="greedy", disable=not progress, unit="round"):
            started = time.perf_counter()
            totals = [0.0] * len(kept)
            current = 0.0
            for batch, gold in zip(batches, golds):
                states, hidden = batch.through(layers, kept)  # states[p]: the stream entering kept[p]
                if not order:
                    current += stream_loss(model, hidden, gold)
                for p in range(len(kept)):  # remove kept[p]: run the blocks after it from the stream entering it
                    hidden = batch.through(layers, kept[p + 1:], states[p])[1]
                    totals[p] += stream_loss(model, hidden, gold)
                del states, hidden
            if not order:
                base_loss = current / tokens
            candidates += len(kept)
            best = min(range(len(kept)), key=lambda p: (totals[p], p))  # ties go to the shallowest layer
            order.append(kept.pop(best))
            losses.append(totals[best] / tokens)
            round_seconds.append(round(time.perf_counter() - started, 3))
            log.info("%s: greedy round %d of %d removes layer %d (loss %.4f, %.0f s)", model_id or "model",
                     len(order), rounds, order[-1], losses[-1], round_seconds[-1])
    finally:
        model.train(was_training)
    return GreedyOrder(order=order, losses=losses, base_loss=base_loss, num_layers=L, tokens=tokens,
                       seconds=round(time.perf_counter() - t0, 3), candidates=candidates,
                       extra={"blocks": int(blocks.shape[0]), "seq_len": int(blocks.shape[1]),
                              "dtype": str(next(model.parameters()).dtype), "round_seconds": round_seconds})
