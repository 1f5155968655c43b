"""Profile a model: the distance between residual streams x^l and x^{l+n} for every l and n.

One forward pass per batch yields the whole table. Forward pre-hooks on the
decoder blocks capture x^l, the stream entering block l, and a forward hook on
the last block captures x^L before the final norm (``hidden_states[-1]`` of HF
is after it). Each captured stream is reduced at once to the vectors the
metric needs and normalised; a batched Gram product then gives the cosine of
every pair (l, m) together, so the cost over a plain forward pass is one small
matmul per batch instead of L separate passes.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ray_prune.core.architecture import decoder, decoder_layers, input_device
from ray_prune.core.data import texts_hash
from ray_prune.core.distance import METRICS, DistanceTable, Metric
from ray_prune.errors import UserError


class _Capture:
    """Hooks that reduce each block's input (and the last block's output) as it streams past."""

    def __init__(self, layers: nn.ModuleList, metric: str) -> None:
        self.metric = metric
        self.select: torch.Tensor | None = None  # (B,) last-token indices, or (B, T) bool mask
        self.vectors: list[torch.Tensor] = []
        self.handles = [layer.register_forward_pre_hook(self._pre, with_kwargs=True) for layer in layers]
        self.handles.append(layers[-1].register_forward_hook(self._post))

    def _reduce(self, h: torch.Tensor) -> None:
        if self.metric == "angular":
            picked = h[torch.arange(h.shape[0], device=h.device), self.select]  # (B, H)
        else:
            picked = h[self.select]  # (tokens, H)
        self.vectors.append(nn.functional.normalize(picked.float(), dim=-1))

    def _pre(self, module, args, kwargs):
        self._reduce(args[0] if args else kwargs["hidden_states"])

    def _post(self, module, args, output):
        self._reduce(output[0] if isinstance(output, (tuple, list)) else output)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def pair_distances(unit: torch.Tensor, metric: str) -> torch.Tensor:
    """Summed distance over samples between every pair of streams.

    ``unit`` is (samples, L+1, H) of unit vectors; the result is (L+1, L+1) in fp64.
    """
    cos = torch.bmm(unit, unit.transpose(1, 2)).clamp_(-1.0, 1.0)  # (S, L+1, L+1)
    d = 1.0 - cos if metric == "block_influence" else torch.arccos(cos) / math.pi
    return d.sum(0).double()


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens, so left and right padding see the same positions."""
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding token of each row, for either padding side."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, -1).amax(-1)


@torch.inference_mode()
def profile(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    metric: Metric = "angular",
    batch_size: int = 8,
    max_length: int = 1024,
    model_id: str | None = None,
    progress: bool = True,
) -> DistanceTable:
    """Distance table of ``model`` on ``texts`` (the paper uses C4), in one pass over them."""
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}", f"use one of {', '.join(METRICS)}")
    if not texts:
        raise UserError("no calibration texts", "pass at least one non-empty text")
    if batch_size < 1 or max_length < 2:
        raise UserError(f"batch_size={batch_size}, max_length={max_length}", "use batch_size >= 1, max_length >= 2")
    layers = decoder_layers(model)
    L = len(layers)
    body = decoder(model)
    device = input_device(model)
    total = torch.zeros(L + 1, L + 1, dtype=torch.float64, device=device)
    samples = tokens = 0
    # Sorting by length keeps padding (wasted compute) low; the table does not depend on order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    capture = _Capture(layers, metric)
    t0 = time.perf_counter()
    try:
        from tqdm.auto import tqdm

        for idx in tqdm(batches, desc="profile", disable=not progress, unit="batch"):
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            capture.select = last_token_index(mask) if metric == "angular" else mask.bool()
            capture.vectors = []
            body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
            if len(capture.vectors) != L + 1:
                raise RuntimeError(f"captured {len(capture.vectors)} streams, expected {L + 1}")
            unit = torch.stack(capture.vectors, dim=1)  # (samples or tokens, L+1, H)
            total += pair_distances(unit, metric)
            samples += len(idx)
            tokens += int(mask.sum())
    finally:
        capture.remove()
    count = samples if metric == "angular" else tokens
    distances = (total / count).cpu().numpy()
    np.fill_diagonal(distances, 0.0)
    name = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return DistanceTable(
        model_id=str(name), metric=metric, num_layers=L, distances=distances, samples=samples, tokens=tokens,
        data_hash=texts_hash(texts, max_length, metric, getattr(tokenizer, "name_or_path", "")),
        max_length=max_length,
        extra={"dtype": str(next(model.parameters()).dtype), "device": str(device),
               "seconds": round(time.perf_counter() - t0, 3)},
    )
