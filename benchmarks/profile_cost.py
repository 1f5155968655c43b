"""Profiling cost: the full distance table against a plain forward pass, and against one pass per n.

Prints, for each model: the median time of
- a plain forward pass of the CausalLM over the calibration batches (no hooks),
- ``ray_prune.profile`` (every l and n from one pass per batch),
- the way public scripts compute it: for each block size n, a pass with
  ``output_hidden_states=True`` that copies every hidden state to the host and
  then compares layer l with layer l+n,
and the ratios profile/forward (target <= 1.10) and per-n/profile (the speed-up).

    python benchmarks/profile_cost.py --models smollm2-135m gemma3-270m --samples 16 --max-length 256
"""

from __future__ import annotations

import argparse
import math

import torch

from timing import machine, median_seconds


def batches(tok, texts, batch_size, max_length, device):
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for i in range(0, len(order), batch_size):
        enc = tok([texts[j] for j in order[i:i + batch_size]], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length)
        yield enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.inference_mode()
def plain_forward(model, data):
    for ids, mask in data:
        model(input_ids=ids, attention_mask=mask, use_cache=False)


@torch.inference_mode()
def per_n_on_host(model, data, num_layers):
    """One pass per n; hidden states moved to the host; last-token angular distance per (l, l+n)."""
    from ray_prune.distance import last_token_index

    table = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
    for n in range(1, num_layers + 1):
        for ids, mask in data:
            hs = [h.float().cpu() for h in model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                                use_cache=False).hidden_states]
            last = last_token_index(mask).cpu()
            rows = torch.arange(ids.shape[0])
            for l in range(0, num_layers - n + 1):
                a, b = hs[l][rows, last], hs[l + n][rows, last]
                cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
                table[l, l + n] += (torch.arccos(cos) / math.pi).sum().double()
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-n-repeats", type=int, default=1, help="the per-n baseline is L times slower: fewer runs")
    args = ap.parse_args()

    from ray_prune.data import load_texts
    from ray_prune.distance import profile
    from ray_prune.models import load_model

    texts = load_texts("calibration", args.samples)
    print(f"# profile cost on {machine()}; {args.samples} samples x {args.max_length} tokens, batch {args.batch_size}")
    print("| model | L | dtype | forward s | profile s | profile/forward | per-n s | per-n/profile |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model, tok = load_model(name)
        device = next(model.parameters()).device
        data = list(batches(tok, texts, args.batch_size, args.max_length, device))
        L = model.config.num_hidden_layers
        fwd = median_seconds(lambda: plain_forward(model, data), args.repeats)
        prof = median_seconds(lambda: profile(model, tok, texts, batch_size=args.batch_size,
                                              max_length=args.max_length, progress=False), args.repeats)
        per_n = median_seconds(lambda: per_n_on_host(model, data, L), args.per_n_repeats, warmup=0)
        print(f"| {name} | {L} | {model.dtype} | {fwd:.2f} | {prof:.2f} | {prof / fwd:.2f}x | {per_n:.1f} | "
              f"{per_n / prof:.1f}x |", flush=True)
        del model


if __name__ == "__main__":
    main()
