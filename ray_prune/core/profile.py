"""Profile a model: the distance between residual streams x^l and x^{l+n} for every l and n.

One forward pass per batch yields the whole table. Forward pre-hooks on the
decoder blocks capture x^l, the stream entering block l, and a forward hook on
the last block captures x^L before the final norm (``hidden_states[-1]`` of HF
is after it). Each captured stream is reduced at once to the vectors the
metric needs and normalised; a batched Gram product then gives the cosine of
every pair (l, m) together, so the cost over a plain forward pass is one small
matmul per batch instead of L separate passes.

The model may be split across devices or have offloaded blocks (accelerate's
``dispatch_model``/``cpu_offload`` hooks, a ``device_map``): the input goes to
the device the embedding runs on, and each captured vector moves to it, where
the totals are summed. ``ray_prune.core.profile_streamed`` reuses the
reduction and the pair distances here to profile a model one block at a time.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ray_prune.core.calibration import DEFAULT
from ray_prune.core.architecture import decoder, decoder_layers
from ray_prune.core.data import texts_hash
from ray_prune.core.distance import METRICS, DistanceTable, Metric
from ray_prune.errors import UserError

log = logging.getLogger(__name__)  # progress lines: a sweep forwards them to the driver, the CLI prints them


def reduce_stream(h: torch.Tensor, select: torch.Tensor, metric: str) -> torch.Tensor:
    """The unit fp32 vectors of one captured stream the metric compares: the last non-padding token of each row
    (``angular``, ``select`` (B,) indices) or every non-padding token (``select`` a (B, T) bool mask)."""
    select = select.to(h.device)  # a no-op on one device; a block of a dispatched model may sit on another
    if metric == "angular":
        picked = h[torch.arange(h.shape[0], device=h.device), select]  # (B, H)
    else:
        picked = h[select]  # (tokens, H)
    return nn.functional.normalize(picked.float(), dim=-1)


def block_output(output) -> torch.Tensor:
    """The hidden states a decoder block returns (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, (tuple, list)) else output


class _Capture:
    """Hooks that reduce each block's input (and the last block's output) as it streams past.

    The vectors are moved to ``device``, where the running totals live: the blocks of a model split across
    devices see their inputs on the device of the block before them.
    """

    def __init__(self, layers: nn.ModuleList, metric: str, device: torch.device) -> None:
        self.metric = metric
        self.device = device
        self.select: torch.Tensor | None = None  # (B,) last-token indices, or (B, T) bool mask
        self.vectors: list[torch.Tensor] = []
        self.handles = [layer.register_forward_pre_hook(self._pre, with_kwargs=True) for layer in layers]
        self.handles.append(layers[-1].register_forward_hook(self._post))

    def _reduce(self, h: torch.Tensor) -> None:
        self.vectors.append(reduce_stream(h, self.select, self.metric).to(self.device))

    def _pre(self, module, args, kwargs):
        self._reduce(args[0] if args else kwargs["hidden_states"])

    def _post(self, module, args, output):
        self._reduce(block_output(output))

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


def check_inputs(metric: str, texts: Sequence[str], batch_size: int, max_length: int) -> None:
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}", f"use one of {', '.join(METRICS)}")
    if not texts:
        raise UserError("no calibration texts", "pass at least one non-empty text")
    if batch_size < 1 or max_length < 2:
        raise UserError(f"batch_size={batch_size}, max_length={max_length}", "use batch_size >= 1, max_length >= 2")


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of ``texts`` in batches; sorting by length keeps padding (wasted compute) low, and the table does
    not depend on order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def encode(tokenizer, texts: Sequence[str], idx: list[int], max_length: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of one batch, padded and truncated, on ``device``."""
    enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                    max_length=max_length)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def selector(mask: torch.Tensor, metric: str) -> torch.Tensor:
    """What ``reduce_stream`` picks of a batch: last-token indices (``angular``) or the non-padding mask."""
    return last_token_index(mask) if metric == "angular" else mask.bool()


def run_decoder(body: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    return body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)


def embedding_device(model: nn.Module) -> torch.device:
    """Where the input ids go: the device the embedding runs on.

    A block dispatched or offloaded by accelerate (``dispatch_model``, ``cpu_offload``, a ``device_map``) keeps its
    weights on the meta device, or on the CPU, until its hook moves them to its execution device; a plain model's
    embedding runs where its weight is.
    """
    model = getattr(model, "get_base_model", lambda: model)()
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev)
    return emb.weight.device


def make_table(total: torch.Tensor, samples: int, tokens: int, metric: str, num_layers: int, name: str,
               tokenizer, texts: Sequence[str], max_length: int, extra: dict) -> DistanceTable:
    """The table from the summed pair distances: the mean over samples (``angular``) or tokens (the others)."""
    count = samples if metric == "angular" else tokens
    distances = (total / count).cpu().numpy()
    np.fill_diagonal(distances, 0.0)
    return DistanceTable(
        model_id=str(name), metric=metric, num_layers=num_layers, distances=distances, samples=samples,
        tokens=tokens, data_hash=texts_hash(texts, max_length, metric, getattr(tokenizer, "name_or_path", "")),
        max_length=max_length, extra=extra,
    )


@torch.inference_mode()
def profile(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    metric: Metric = DEFAULT.metric,  # type: ignore[assignment]
    batch_size: int = DEFAULT.batch_size,
    max_length: int = DEFAULT.max_length,
    model_id: str | None = None,
    progress: bool = True,
) -> DistanceTable:
    """Distance table of ``model`` on ``texts`` (the paper uses C4), in one pass over them.

    The model may be split across devices or have offloaded blocks (accelerate hooks, a ``device_map``): the
    input goes to the embedding's device, and the totals are summed there.
    """
    check_inputs(metric, texts, batch_size, max_length)
    layers = decoder_layers(model)
    L = len(layers)
    body = decoder(model)
    device = embedding_device(model)
    total = torch.zeros(L + 1, L + 1, dtype=torch.float64, device=device)
    samples = tokens = 0
    capture = _Capture(layers, metric, device)
    t0 = time.perf_counter()
    try:
        from tqdm.auto import tqdm

        batches = length_sorted_batches(texts, batch_size)
        log.info("%s: profiling %d documents in %d batches", model_id or "model", len(texts), len(batches))
        every = max(1, len(batches) // 4)
        for i, idx in enumerate(tqdm(batches, desc="profile", disable=not progress, unit="batch"), 1):
            if i % every == 0 and i < len(batches):
                log.info("%s: profile batch %d of %d", model_id or "model", i, len(batches))
            ids, mask = encode(tokenizer, texts, idx, max_length, device)
            capture.select = selector(mask, metric)
            capture.vectors = []
            run_decoder(body, ids, mask)
            if len(capture.vectors) != L + 1:
                raise RuntimeError(f"captured {len(capture.vectors)} streams, expected {L + 1}")
            unit = torch.stack(capture.vectors, dim=1)  # (samples or tokens, L+1, H)
            total += pair_distances(unit, metric)
            samples += len(idx)
            tokens += int(mask.sum())
    finally:
        capture.remove()
    name = model_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
    return make_table(total, samples, tokens, metric, L, name, tokenizer, texts, max_length,
                      extra={"dtype": str(next(model.parameters()).dtype), "device": str(device),
                             "seconds": round(time.perf_counter() - t0, 3)})
