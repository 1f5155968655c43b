"""Peak memory of the evaluation: each lm-eval task through the scorer or ``generate``, then the C4 loss.

Sources
-------
* Evaluation, log-likelihood tasks (:func:`scoring_bytes`): the scorer the harness runs,
  ``core.evaluation.loglikelihood.score_continuations``, not lm-eval's HF path (a KV
  cache and full logits at every position). It runs a prefix that contexts share once and
  the contexts and their continuation rows against its keys and values, so it holds up
  to three caches (the prefixes', the contexts', the rows'; two with one-token answers),
  each at most batch x the task's longest request; the LM head runs on the scored
  positions only, the task's longest continuation per row (one for answer letters and
  " yes" / " no"), and their log-softmax in fp32. Derived from the scorer's code and
  checked against torch's CPU memory profiler (``memory.terms``, Accuracy).
* Evaluation, generative tasks (:func:`generation_bytes`; the registry's ``output_type:
  generate_until``, GSM8K): lm-eval's own ``generate_until``, which calls ``model.generate``
  with its cache on left-padded contexts cut to ``max_length - max_gen_toks`` tokens: the
  cache ends holding batch x (context + ``max_gen_toks``) tokens of every layer
  (``eval.max_gen_toks``, else lm-eval's 256), on top of the prefill forward and its mask.
"""

from __future__ import annotations

from ray_prune.core.evaluation.tasks import TASKS
from ray_prune.core.memory.arch import Arch
from ray_prune.core.memory.inference import inference_layer_bytes, next_token_loss_bytes
from ray_prune.core.memory.terms import Term, total_bytes
from ray_prune.core.memory.workload import LM_EVAL_MAX_GEN_TOKS, Workload, continuation_tokens


def scoring_bytes(arch: Arch, c: int, layers: int, batch: int, row: int, scored: int) -> tuple[int, int, str]:
    """(KV caches, everything else) of ``core.evaluation.loglikelihood.score_continuations`` on one batch of
    ``batch`` rows of up to ``row`` tokens, ``scored`` positions scored per row.

    The scorer runs a prefix that several contexts share once and keeps its cache while those contexts run
    against it; a context with several continuation rows keeps its own cache while the rows run against it
    (each forward gathers its past into a fresh cache). So up to three caches are alive at once, the prefixes',
    the contexts' and the rows', each at most ``batch x row`` tokens of every layer; one-token continuations
    (answer letters) share one row per context, so the third never exists for them. A forward: one block at
    its widest point over ``batch x row`` tokens with an explicit mask (a row that continues a cached past
    attends through one, and SDPA then repeats grouped keys and values to every head), plus that mask. Then the
    LM head on the scored positions only (``logits_to_keep``) and their log-softmax in fp32; continuation rows
    run while the log-probabilities of their context's row are still held.
    """
    tokens = batch * row
    caches = 2 if scored == 1 else 3  # the prefixes', the contexts' and, with several rows per context, the rows'
    kv = caches * layers * 2 * tokens * arch.kv_heads * arch.head_dim * c
    forward = inference_layer_bytes(arch, tokens, c, row, True) + tokens * row * (c if arch.eager else 1)
    positions = batch * scored
    logits = positions * arch.vocab
    head = (tokens + positions) * arch.hidden * c + logits * c * (2 if arch.final_softcap else 1)
    log_softmax = logits * (c + (4 if c != 4 else 0) + 4)  # the logits, their fp32 copy, the log-probabilities
    held = logits * 4 if scored > 1 else 0
    return kv, max(forward, head, held + log_softmax), f"batch {batch} x {row} tokens, {positions} scored, " \
        f"{caches} caches"


def generation_bytes(arch: Arch, c: int, layers: int, batch: int, context: int, generated: int) -> tuple[int, int, str]:
    """(KV cache, everything else) of one lm-eval ``generate_until`` batch: ``model.generate`` with its cache.

    lm-eval cuts each context to ``max_length - generated`` tokens, pads the batch on the left (an attention
    mask) and generates up to ``generated`` tokens, so the cache ends holding ``batch x (context + generated)``
    tokens of every layer. Before it: the prefill forward over the contexts (one block at its widest point, with
    the mask). While decoding, a step's ``torch.cat`` holds one layer's keys and values twice, and ``generate``
    keeps the last position's logits only (``logits_to_keep=1``) with an fp32 copy.
    """
    generated = min(generated, arch.max_length - 1)
    prompt = max(1, min(context, arch.max_length - generated))
    per_token = 2 * arch.kv_heads * arch.head_dim * c  # one layer's key and value
    kv = layers * batch * (prompt + generated) * per_token
    prefill = inference_layer_bytes(arch, batch * prompt, c, prompt, True) + \
        batch * prompt * prompt * (c if arch.eager else 1)
    step = batch * (prompt + generated) * per_token + batch * arch.vocab * (c + 8)
    return kv, max(prefill, step), f"batch {batch} x ({prompt} + {generated} generated) tokens"


def generates(task: str) -> bool:
    """Whether lm-eval runs ``task`` as ``generate_until`` (its registry spec's ``output_type``)."""
    # getattr: TaskSpec.output_type is being added beside this change; a registry without it has no generative task
    return getattr(TASKS[task], "output_type", "multiple_choice") == "generate_until"


def eval_terms(arch: Arch, w: Workload, c: int, layers: int) -> list[Term]:
    """``trial.run_evaluation``: each lm-eval task in turn (scored or generated), then the C4 loss; the largest
    of their peaks (each frees its tensors before the next)."""
    batch = w.evaluation.batch_size
    # getattr: EvalConfig.max_gen_toks is being added beside this change; None (or no such setting): lm-eval's cap
    generated = getattr(w.evaluation, "max_gen_toks", None) or LM_EVAL_MAX_GEN_TOKS
    options: list[list[Term]] = []
    for name, shots in w.tasks:
        row = w.request_tokens(arch, (name, shots))
        if generates(name):
            kv, other, how = generation_bytes(arch, c, layers, batch, row, generated)
            options.append([Term(f"eval: KV cache ({name}, generation)", kv, True, how),
                            Term(f"eval: prefill and decoding ({name})", other, False, how)])
        else:
            kv, other, how = scoring_bytes(arch, c, layers, batch, row, continuation_tokens(name, row))
            options.append([Term(f"eval: KV caches ({name}, shared contexts)", kv, True, how),
                            Term(f"eval: forward and scored logits ({name})", other, False, how)])
    if w.evaluation.c4_sequences:
        loss, how = next_token_loss_bytes(arch, c, batch, w.evaluation.seq_len)
        options.append([Term("eval: C4 loss logits and activations", loss, False, how)])
    return max(options, key=total_bytes) if options else []
