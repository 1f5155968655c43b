"""Pruned-model inference: prefill throughput and decode latency against the unpruned model.

Removing n of L blocks can at best speed the blocks up by L/(L-n); embeddings
and the LM head cost the same either way. We time both the block stack alone
(the decoder without the LM head, the part the ideal applies to) and the whole
model, and print each measured speed-up as a fraction of the ideal (target >= 0.9
for the blocks).

    python benchmarks/pruned_inference.py --models smollm2-135m gemma3-270m
"""

from __future__ import annotations

import argparse
import copy

import torch

from timing import machine, median_seconds


@torch.inference_mode()
def prefill_blocks(model, ids):
    from ray_prune.architecture import decoder

    decoder(model)(input_ids=ids, use_cache=False)


@torch.inference_mode()
def prefill_full(model, ids):
    model(input_ids=ids, use_cache=False)


@torch.inference_mode()
def decode(model, ids, new_tokens):
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                   pad_token_id=0)


def param_mib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from ray_prune.models import load_model
    from ray_prune.prune import prune_layers
    from ray_prune.select import layers_to_remove, n_from_fraction

    print(f"# pruned inference on {machine()}; prefill {args.batch}x{args.seq_len} tokens, "
          f"decode {args.new_tokens} tokens at batch 1")
    print("| model | n/L | ideal | blocks prefill speed-up (of ideal) | full prefill tok/s (speed-up) "
          "| decode ms/token (speed-up) | weights MiB |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        base, tok = load_model(name)
        L = base.config.num_hidden_layers
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, 1000, (args.batch, args.seq_len), generator=g).to(base.device)
        prompt = ids[:1, :32]
        ref = {
            "blocks": median_seconds(lambda: prefill_blocks(base, ids), args.repeats),
            "full": median_seconds(lambda: prefill_full(base, ids), args.repeats),
            "decode": median_seconds(lambda: decode(base, prompt, args.new_tokens), args.repeats),
        }
        tokens = args.batch * args.seq_len
        print(f"| {name} | 0/{L} | 1.00 | 1.00 | {tokens / ref['full']:.0f} (1.00) | "
              f"{1000 * ref['decode'] / args.new_tokens:.1f} (1.00) | {param_mib(base):.0f} |", flush=True)
        for f in args.fractions:
            n = n_from_fraction(f, L)
            pruned = prune_layers(copy.deepcopy(base), layers_to_remove("deepest", L, n=n))
            got = {
                "blocks": median_seconds(lambda: prefill_blocks(pruned, ids), args.repeats),
                "full": median_seconds(lambda: prefill_full(pruned, ids), args.repeats),
                "decode": median_seconds(lambda: decode(pruned, prompt, args.new_tokens), args.repeats),
            }
            ideal = L / (L - n)
            s = {k: ref[k] / got[k] for k in ref}
            print(f"| {name} | {n}/{L} | {ideal:.2f} | {s['blocks']:.2f} ({s['blocks'] / ideal:.2f}) | "
                  f"{tokens / got['full']:.0f} ({s['full']:.2f}) | "
                  f"{1000 * got['decode'] / args.new_tokens:.1f} ({s['decode']:.2f}) | {param_mib(pruned):.0f} |",
                  flush=True)
            del pruned
        del base


if __name__ == "__main__":
    main()
