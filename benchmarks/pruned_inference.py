"""Pruned-model inference: prefill throughput and decode latency against the unpruned model.

Removing n of L blocks can at best speed the blocks up by L/(L-n); embeddings
and the LM head cost the same either way. We time both the block stack alone
(the decoder without the LM head, the part the ideal applies to) and the whole
model, for prefill (one forward over batch x seq-len tokens) and for decode
(per-token latency of a KV-cached greedy loop at batch 1 after a prompt, the
prompt's prefill not counted), and print each blocks speed-up as a fraction of
L/(L-n) (target >= 0.9). For the whole model the ideal is Amdahl's: the LM head
does not shrink, so we also print its fraction of
(B + H) / (B (L-n)/L + H), with B and H the multiply-adds per token of the
blocks' and the head's linear layers. Timings of the unpruned and the pruned
models are interleaved. Memory: weights and the KV cache at the decode's end.

    python benchmarks/pruned_inference.py --models smollm2-135m gemma3-270m
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from timing import device_tag, interleaved_medians, machine, verdict

TARGET = 0.9


@torch.inference_mode()
def prefill(module, ids):
    module(input_ids=ids, use_cache=False)


@torch.inference_mode()
def decode_seconds_per_token(module, prompt, new_tokens, greedy):
    """Seconds per generated token of a KV-cached loop; ``greedy`` picks the next token from the logits."""
    out = module(input_ids=prompt, use_cache=True)
    cache, nxt = out.past_key_values, prompt[:, -1:]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(new_tokens):
        out = module(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        if greedy:
            nxt = out.logits[:, -1:].argmax(-1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / new_tokens, cache


def cache_mib(cache) -> float:
    return sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
               for t in vars(layer).values() if torch.is_tensor(t)) / 2**20


def param_mib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def linear_macs(model):
    """(multiply-adds per token in the blocks' linears, in the LM head)."""
    from ray_prune.core.architecture import decoder_layers

    blocks = sum(m.weight.numel() for m in decoder_layers(model).modules() if isinstance(m, torch.nn.Linear))
    return blocks, model.get_output_embeddings().weight.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens before the timed decode steps")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from ray_prune.core.architecture import decoder
    from ray_prune.core.models import load_model
    from ray_prune.core.prune import prune_layers
    from ray_prune.core.select import layers_to_remove, n_from_fraction

    print(f"# Pruned-model inference ({device_tag()})\n\n{machine()}; prefill {args.batch} x {args.seq_len} tokens, "
          f"decode {args.new_tokens} tokens at batch 1 after a {args.prompt}-token prompt; deepest blocks removed; "
          f"median of {args.repeats} interleaved repeats\n")
    print("| model | n/L | ideal L/(L-n) | **blocks prefill speed-up (of ideal)** | **blocks decode speed-up "
          "(of ideal)** | full prefill tok/s (speed-up, of Amdahl ideal) | full decode ms/token (speed-up, of "
          "Amdahl ideal) | weights MiB | KV cache MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for name in args.models:
        base, _ = load_model(name)
        L = base.config.num_hidden_layers
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(10, 1000, (args.batch, args.seq_len), generator=g).to(base.device)
        prompt = torch.randint(10, 1000, (1, args.prompt), generator=g).to(base.device)
        B, H = linear_macs(base)
        models = {0: base}
        for f in args.fractions:
            n = n_from_fraction(f, L)
            models[n] = prune_layers(copy.deepcopy(base), layers_to_remove("deepest", L, n=n))
        fns, caches = {}, {}
        for n, m in models.items():
            fns[(n, "blocks")] = lambda m=m: prefill(decoder(m), ids)
            fns[(n, "full")] = lambda m=m: prefill(m, ids)
            for part, mod, greedy in (("blocks_decode", decoder(m), False), ("full_decode", m, True)):
                def run(mod=mod, greedy=greedy, key=(n, part)):  # returns its own time: the prompt's prefill excluded
                    caches[key] = decode_seconds_per_token(mod, prompt, args.new_tokens, greedy)
                    return caches[key][0]
                fns[(n, part)] = run
        t = interleaved_medians(fns, args.repeats)
        tokens = args.batch * args.seq_len
        for n, m in models.items():
            ideal = L / (L - n)
            amdahl = (B + H) / (B * (L - n) / L + H)
            s = {part: t[(0, part)] / t[(n, part)] for part in ("blocks", "blocks_decode", "full", "full_decode")}
            if n:
                verdicts.append((name, n, L, s["blocks"] / ideal, s["blocks_decode"] / ideal))
            print(f"| {name} | {n}/{L} | {ideal:.2f} | {s['blocks']:.2f} ({s['blocks'] / ideal:.2f}) | "
                  f"{s['blocks_decode']:.2f} ({s['blocks_decode'] / ideal:.2f}) | "
                  f"{tokens / t[(n, 'full')]:.0f} ({s['full']:.2f}, {s['full'] / amdahl:.2f}) | "
                  f"{1000 * t[(n, 'full_decode')]:.1f} ({s['full_decode']:.2f}, {s['full_decode'] / amdahl:.2f}) | "
                  f"{param_mib(m):.0f} | {cache_mib(caches[(n, 'full_decode')][1]):.1f} |", flush=True)
        del base, models, fns, caches

    print()
    for name, n, L, pre, dec in verdicts:
        print(f"- {name}, n/L = {n}/{L}: blocks speed-up as a fraction of L/(L-n): prefill {pre:.2f} "
              f"(**{verdict(pre, TARGET, True)}**), decode {dec:.2f} (**{verdict(dec, TARGET, True)}**), "
              f"target >= {TARGET}")
    print("\nThe whole model cannot reach L/(L-n): the embedding lookup, final norm and LM head (a matmul with the "
          "full vocabulary per token) do not shrink, hence the Amdahl ideal for the full-model columns (by "
          "multiply-adds per token: the head is a large share of these small models, above all of Gemma-3-270M "
          "with its 262k-token vocabulary). The blocks' own time scales with their number.")


if __name__ == "__main__":
    main()
