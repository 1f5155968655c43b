"""Log-likelihoods of continuations: every shared piece of input runs once, the LM head only where a token is scored.

lm-eval's HF wrapper runs each request as its own row, context and continuation
joined, and asks for logits at every position. Both repeat work:

- A multiple-choice question sends its context once per choice (ARC's and
  HellaSwag's 4 endings, PIQA's 2 solutions, BoolQ's " no"/" yes"), and a
  few-shot task puts the same exemplars before every question of a subject
  (MMLU 5-shot: the description and 5 dev questions, most of each prompt's
  tokens). Run as independent rows, most of the decoder's work is on token
  sequences it has already seen.
- The LM head is a matmul with the whole vocabulary, so full logits are most of
  the work and memory of a multiple-choice evaluation for large vocabularies:
  Gemma-3's head (262k tokens) costs more multiply-adds per token than all its
  blocks, and at batch 16 x 1024 tokens its fp32 logits alone take 17 GB.

Here the requests form a tree and each node runs once, extending its parent's
key/value cache, with the head only on the positions a request scores
(``logits_to_keep`` with a mask):

1. a prefix that several contexts share (``min_shared_prefix`` tokens or more:
   MMLU's exemplars, once per subject);
2. each context after that prefix, joined to its longest continuation (minus
   the last token, as lm-eval's inputs are); a continuation whose tokens the
   row already holds (a prefix of it, or a one-token answer such as MMLU's
   letters) is scored from the same row;
3. each other continuation, against its context's cache.

A token's states depend only on the tokens before it, so this computes what
lm-eval computes; the scores equal the one-row-per-request scorer's
(``_score_full_rows``, kept for the requests below and as the tests'
reference) to float rounding: the same sums over differently shaped matmuls.
Rows of a batch whose pasts differ in length get their pasts left-padded in the
cache, those slots masked, and their true positions, so rotary embeddings and
sliding windows see exactly the original sequence (pads only precede a row's
tokens, never sit between them: a sliding window counts cache slots). The
caches are config-less ``DynamicCache``\\ s, whose every layer keeps all its
keys: a sliding-window cache layer would drop keys a sibling row still needs;
the window is applied by the attention mask, as without a cache. A cache is
only read once built (each forward gathers its past into a fresh one), so no
request sees another's tokens.

Requests that lm-eval's truncation cuts (context and continuation longer than
``max_length + 1`` tokens) run as one row each, as before: cut from the left
by their own length, they no longer share a context.

Precision (``logprobs``, ``EvalConfig.logprobs``): by default the log-softmax
is taken in fp32 whatever the model's dtype ("fp32"), so a bf16 model's scores
are those of its bf16 logits, not rounded again; lm-eval's HF wrapper takes it
in the model's dtype (its ``softmax_dtype`` unset) and sums a continuation's
log-probabilities in it too, which in bf16 rounds each token's to 8 significant
bits and the sum again. "model" does what lm-eval does, to reproduce its numbers;
"fp32" is what lm-eval gives with ``softmax_dtype=float32`` in its model_args
(``tests/core/evaluation/test_loglikelihood.py`` measures both against lm-eval).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ray_prune.core.evaluation.config import DEFAULT, LOGPROBS

Request = tuple[tuple[str, str], list[int], list[int]]  # ((context, continuation), context ids, continuation ids)

# Contexts that share fewer leading tokens run them each: a prefix costs a forward pass of its own (every forward
# streams all the weights) and splits its contexts' batches from the rest. 16 clusters MMLU's few-shot prompts by
# subject (hundreds of tokens) and WinoGrande's two options (the sentence up to the blank, 10-20 tokens), which also
# pays on a CPU (benchmarks/continuation_scoring.py, the RESULTS.md note), and nothing in 0-shot ARC, PIQA or BoolQ.
MIN_SHARED_PREFIX = 16


def _log_softmax(logits: torch.Tensor, logprobs: str) -> torch.Tensor:
    """Log-probabilities of ``logits`` in the precision ``logprobs`` names ("fp32", or the logits' own: "model")."""
    return F.log_softmax(logits.float() if logprobs == "fp32" else logits, dim=-1)


@torch.no_grad()
def score_continuations(model, requests: Sequence[Request], max_length: int, batch_size: int,
                        device: torch.device, progress: bool = False, *,
                        min_shared_prefix: int | None = MIN_SHARED_PREFIX,
                        logprobs: str = DEFAULT.logprobs) -> list[tuple[float, bool]]:
    """(sum of continuation log-probabilities, whether greedy decoding gives the continuation) per request.

    Scores are lm-eval's for its inputs (context and continuation joined, cut
    from the left to ``max_length + 1`` tokens, the last token dropped), each
    shared context and shared prefix computed once (module docstring).
    ``batch_size`` caps the rows of every forward pass. ``min_shared_prefix``:
    the fewest tokens that contexts must share to run them once (None: never).
    ``logprobs``: "fp32" takes the log-softmax in fp32, "model" in the model's
    dtype, as lm-eval does (module docstring).
    """
    if logprobs not in LOGPROBS:
        raise ValueError(f"logprobs must be one of {LOGPROBS}, got {logprobs!r}")
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), desc="Scoring continuations", unit="request", disable=not progress)
    cut = [i for i, (_, ctx, cont) in enumerate(requests) if len(ctx) + len(cont) > max_length + 1]
    if cut:
        for i, answer in zip(cut, _score_full_rows(model, [requests[i] for i in cut], max_length, batch_size, device,
                                                     logprobs=logprobs)):
            results[i] = answer
        bar.update(len(cut))
    cut_set = set(cut)
    contexts = _contexts(requests, [i for i in range(len(requests)) if i not in cut_set])
    clusters, alone = _clusters(contexts, min_shared_prefix)
    run = _Runner(model, requests, device, batch_size, results, bar, logprobs)
    for chunk in _chunks(sorted(alone, key=_Context.order), batch_size):
        run.contexts(chunk, None)
    for group in _chunks(sorted(clusters, key=lambda c: -len(c.prefix)), batch_size):
        _, cache, _ = run.forward([c.prefix for c in group], [(0, 0)] * len(group), None, keep=True)
        members = sorted(((row, ctx) for row, cluster in enumerate(group) for ctx in cluster.members),
                         key=lambda m: m[1].order())
        for chunk in _chunks(members, batch_size):
            run.contexts([ctx for _, ctx in chunk], (cache, [(row, 0, ctx.shared) for row, ctx in chunk]))
        del cache
    bar.close()
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- the tree of requests


@dataclass
class _Row:
    """One continuation row of a context: its tokens (a continuation minus its last token) and the requests it scores.

    A request is served by the first row whose tokens start with its continuation's ``[:-1]``.
    """

    tokens: tuple[int, ...]
    requests: list[int] = field(default_factory=list)


@dataclass
class _Context:
    tokens: tuple[int, ...]
    rows: list[_Row]  # rows[0], the longest, runs joined to the context; the others against its cache
    shared: int = 0  # leading tokens run once for the cluster of contexts that share them

    @property
    def head(self) -> tuple[int, ...]:
        """The tokens its first forward runs: the context after its shared prefix, then its first row."""
        return self.tokens[self.shared:] + self.rows[0].tokens

    def order(self) -> tuple[bool, int]:
        """Batch order: contexts with further rows first, so that those rows fill whole batches of their own (every
        forward streams all the weights: on a CPU a small batch costs nearly what a full one does); then longest
        first, as lm-eval, so that rows of similar lengths share a batch and its padding stays small."""
        return len(self.rows) == 1, -len(self.head)


@dataclass
class _Cluster:
    prefix: tuple[int, ...]
    members: list[_Context]


def _contexts(requests: Sequence[Request], indices: Sequence[int]) -> list[_Context]:
    """The distinct contexts of the requests at ``indices``, each with the fewest rows that score all its requests."""
    by_context: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
    for i in indices:
        _, ctx, cont = requests[i]
        by_context.setdefault(tuple(ctx), {}).setdefault(tuple(cont[:-1]), []).append(i)
    out = []
    for ctx, groups in by_context.items():
        rows: list[_Row] = []
        for tail in sorted(groups, key=lambda t: (-len(t), t)):  # longest first: a shorter one may ride along
            row = next((r for r in rows if r.tokens[:len(tail)] == tail), None)
            if row is None:
                row = _Row(tail)
                rows.append(row)
            row.requests.extend(groups[tail])
        out.append(_Context(ctx, rows))
    return out


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def _clusters(contexts: list[_Context], min_shared: int | None) -> tuple[list[_Cluster], list[_Context]]:
    """Contexts that share a prefix of at least ``min_shared`` tokens, clustered, and the rest.

    Sorted token sequences put contexts with a common prefix next to each other;
    a cluster is a run of neighbours that share ``min_shared`` tokens or more,
    and its prefix what all of them share, short of each context's last token
    (whose logits score the continuations).
    """
    if min_shared is None or len(contexts) < 2:
        return [], list(contexts)
    ordered = sorted(contexts, key=lambda c: c.tokens)
    clusters, alone = [], []
    run, shared = [ordered[0]], len(ordered[0].tokens)

    def close() -> None:
        length = min([shared] + [len(c.tokens) - 1 for c in run])
        if len(run) < 2 or length < min_shared:
            alone.extend(run)
            return
        for c in run:
            c.shared = length
        clusters.append(_Cluster(run[0].tokens[:length], run))

    for prev, cur in zip(ordered, ordered[1:]):
        common = _common_length(prev.tokens, cur.tokens)
        if common >= min_shared:
            run.append(cur)
            shared = min(shared, common)
        else:
            close()
            run, shared = [cur], len(cur.tokens)
    close()
    return clusters, alone


def _chunks(items: list, size: int) -> list[list]:
    return [items[k:k + size] for k in range(0, len(items), size)]


# --------------------------------------------------------------------------- running the tree


def _cache_keyword(model) -> str:
    """The forward argument that takes a cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes it through
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _score(rows: torch.Tensor, cont: Sequence[int]) -> tuple[float, bool]:
    """(sum of log-probabilities, greedy) of a continuation from its log-probability rows, one per token."""
    target = torch.tensor(cont, dtype=torch.long, device=rows.device)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(dim=-1) == target).all())


class _Runner:
    """Forward passes over rows that extend cached pasts, and the scores of the requests they serve."""

    def __init__(self, model, requests: Sequence[Request], device: torch.device, batch_size: int,
                 results: list, bar, logprobs: str = DEFAULT.logprobs) -> None:
        self.model, self.requests, self.device, self.batch_size = model, requests, device, batch_size
        self.results, self.bar, self.logprobs = results, bar, logprobs
        self.cache_keyword = _cache_keyword(model)

    def forward(self, rows: Sequence[Sequence[int]], scored: Sequence[tuple[int, int]], parent, keep: bool):
        """Log-probabilities at each row's scored positions ``[a, b)``, the cache if ``keep``, and where each row's
        sequence starts in that cache.

        ``parent`` is None or (cache, [(row in it, start, length)] per row): each
        row continues the ``length`` cached tokens from ``start`` of that row.
        """
        from transformers import DynamicCache

        device = self.device
        batch = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long, device=device)
        mask = torch.zeros(batch.shape, dtype=torch.bool, device=device)
        for b, (ids, (lo, hi)) in enumerate(zip(rows, scored)):
            batch[b, :len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
            mask[b, lo:hi] = True
        kwargs: dict = {"logits_to_keep": mask, "use_cache": False}
        starts = [0] * len(rows)
        cache = None
        if parent is not None or keep:
            cache = DynamicCache()  # no config: full layers everywhere, sliding windows come from the mask
            kwargs.update({self.cache_keyword: cache, "use_cache": True})
        if parent is not None:
            source, links = parent
            lengths = torch.tensor([n for _, _, n in links], device=device)
            width = int(lengths.max())
            starts = [width - n for _, _, n in links]
            if width:
                first = torch.tensor([s for _, s, _ in links], device=device)
                slots = torch.arange(width, device=device)
                index = (first[:, None] + slots[None, :] - (width - lengths)[:, None]).clamp(min=0)
                owner = torch.tensor([r for r, _, _ in links], device=device)[:, None]
                for layer_idx, layer in enumerate(source.layers):  # [rows, heads, width, dim], right-aligned
                    cache.update(layer.keys[owner, :, index].transpose(1, 2),
                                 layer.values[owner, :, index].transpose(1, 2), layer_idx)
                steps = torch.arange(batch.shape[1], device=device)
                kwargs["position_ids"] = lengths[:, None] + steps[None, :]
                if max(starts):  # some row's past is left-padded: mask the pad slots
                    past = slots[None, :] >= (width - lengths)[:, None]
                    kwargs["attention_mask"] = torch.cat(
                        [past, torch.ones(batch.shape, dtype=torch.bool, device=device)], dim=1).long()
        logits = self.model(batch, **kwargs).logits  # [scored positions, vocab]
        if logits.dim() == 3:  # a model that keeps every position: select them here
            logits = logits[mask]
        logprobs = _log_softmax(logits, self.logprobs)
        return list(logprobs.split([hi - lo for lo, hi in scored])), (cache if keep else None), starts

    def contexts(self, contexts: list[_Context], parent) -> None:
        """Score every request of these contexts: one row each for the contexts (after their shared prefix, with
        their longest continuation), then their other continuation rows against the contexts' cache."""
        heads = [ctx.head for ctx in contexts]
        scored = [(len(ctx.tokens) - ctx.shared - 1, len(head)) for ctx, head in zip(contexts, heads)]
        keep = any(len(ctx.rows) > 1 for ctx in contexts)
        logprobs, cache, starts = self.forward(heads, scored, parent, keep)
        firsts, rest = [], []
        for k, (ctx, rows) in enumerate(zip(contexts, logprobs)):
            self._finish(ctx.rows[0], rows, None)
            firsts.append(rows[:1].clone() if len(ctx.rows) > 1 else None)
            rest.extend((k, row) for row in ctx.rows[1:])
        del logprobs, rows  # only the first rows of contexts with further rows are still needed
        rest.sort(key=lambda item: -len(item[1].tokens))
        for chunk in _chunks(rest, self.batch_size):
            links = [(k, starts[k], len(contexts[k].tokens)) for k, _ in chunk]
            tails, _, _ = self.forward([row.tokens for _, row in chunk], [(0, len(row.tokens)) for _, row in chunk],
                                       (cache, links), keep=False)
            for (k, row), rows in zip(chunk, tails):
                self._finish(row, rows, firsts[k])

    def _finish(self, row: _Row, rows: torch.Tensor, first: torch.Tensor | None) -> None:
        """Scores of the requests a row serves, from its log-probability rows (after ``first``, the context's last
        position, when the row ran against the context's cache)."""
        if first is not None:
            rows = torch.cat([first, rows])
        for i in row.requests:
            cont = self.requests[i][2]
            self.results[i] = _score(rows[:len(cont)], cont)
        self.bar.update(len(row.requests))


# --------------------------------------------------------------------------- one row per request


def _groups(requests: Sequence[Request]) -> list[list[int]]:
    """Request indices grouped by model input, longest first: a group shares one row of a batch."""
    by_input: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
    for i, (_, ctx, cont) in enumerate(requests):
        by_input.setdefault((tuple(ctx), tuple(cont[:-1])), []).append(i)
    return sorted(by_input.values(), key=lambda g: (-len(requests[g[0]][1] + requests[g[0]][2]),
                                                     tuple(requests[g[0]][1] + requests[g[0]][2])))


@torch.no_grad()
def _score_full_rows(model, requests: Sequence[Request], max_length: int, batch_size: int,
                     device: torch.device, *, logprobs: str = DEFAULT.logprobs) -> list[tuple[float, bool]]:
    """The scores with one row per distinct (context + continuation[:-1]), batched and cut as lm-eval does.

    What ``score_continuations`` does for requests that truncation cuts, and
    the reference its tests compare the shared-context path against. ``logprobs``:
    as for ``score_continuations``.
    """
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    groups = _groups(requests)
    for start in range(0, len(groups), batch_size):
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
        scores = _log_softmax(logits, logprobs)
        offset = 0
        for group, (a, b) in zip(chunk, spans):
            rows = scores[offset:offset + b - a]
            offset += b - a
            greedy = rows.argmax(dim=-1)
            for i in group:
                cont = torch.tensor(requests[i][2], dtype=torch.long, device=device)
                results[i] = (float(rows.gather(1, cont[:, None]).sum()), bool((greedy == cont).all()))
    return results  # type: ignore[return-value]
