"""Log-likelihoods of continuations, with the LM head run only where a continuation token is scored.

lm-eval's HF wrapper asks the model for logits at every position of every
request, then keeps the few that score the continuation. The LM head is a
matmul with the whole vocabulary, so that is most of the work and most of the
memory of a multiple-choice evaluation for models with large vocabularies:
Gemma-3's head (262k tokens) costs more multiply-adds per token than all its
blocks, and at batch 16 x 1024 tokens its fp32 logits alone take 17 GB. Here
the decoder runs once per batch as before, and the head runs only on the
positions that any request of the batch scores (``logits_to_keep`` with
explicit indices). Requests are batched, truncated and grouped exactly as
lm-eval does (longest first; requests that share a context and differ only in
a one-token continuation, as MMLU's answer letters, share one forward pass), so
the scores are lm-eval's to float rounding (a test compares them).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

Request = tuple[tuple[str, str], list[int], list[int]]  # ((context, continuation), context ids, continuation ids)


def _groups(requests: Sequence[Request]) -> list[list[int]]:
    """Request indices grouped by model input, longest first: a group shares one row of a batch."""
    by_input: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for i, (_, ctx, cont) in enumerate(requests):
        by_input.setdefault((tuple(ctx), tuple(cont[:-1])), []).append(i)
    return sorted(by_input.values(), key=lambda g: (-len(requests[g[0]][1] + requests[g[0]][2]),
                                                     tuple(requests[g[0]][1] + requests[g[0]][2])))


@torch.no_grad()
def score_continuations(model, requests: Sequence[Request], max_length: int, batch_size: int,
                        device: torch.device, progress: bool = False) -> list[tuple[float, bool]]:
    """(sum of continuation log-probabilities, whether greedy decoding gives the continuation) per request.

    Inputs are lm-eval's: context and continuation joined, cut from the left to
    ``max_length + 1`` tokens, the last token dropped, padded on the right.
    """
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    groups = _groups(requests)
    starts = range(0, len(groups), batch_size)
    for start in tqdm(starts, desc="Scoring continuations", unit="batch", disable=not progress):
        chunk = groups[start:start + batch_size]
        inputs, spans = [], []
        for group in chunk:
            _, ctx, cont = requests[group[0]]
            ids = (ctx + cont)[-(max_length + 1):][:-1]
            inputs.append(ids)
            spans.append((len(ids) - len(cont), len(ids)))
        width = max(len(ids) for ids in inputs)
        batch = torch.zeros(len(inputs), width, dtype=torch.long, device=device)
        for row, ids in enumerate(inputs):
            batch[row, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
        scored = torch.zeros(batch.shape, dtype=torch.bool, device=device)
        for row, (a, b) in enumerate(spans):
            scored[row, a:b] = True
        logits = model(batch, logits_to_keep=scored, use_cache=False).logits  # [scored positions, vocab]
        if logits.dim() == 3:  # a model that keeps every position: select them here
            logits = logits[scored]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        offset = 0
        for group, (a, b) in zip(chunk, spans):
            rows = logprobs[offset:offset + b - a]
            offset += b - a
            greedy = rows.argmax(dim=-1)
            for i in group:
                cont = torch.tensor(requests[i][2], dtype=torch.long, device=device)
                results[i] = (float(rows.gather(1, cont[:, None]).sum()), bool((greedy == cont).all()))
    return results  # type: ignore[return-value]
