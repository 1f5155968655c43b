"""Profiling cost: the full distance table against a plain forward pass, and against one pass per n.

Prints, for each model, the median time (repeats interleaved) of
- a plain forward pass of the decoder (embeddings, blocks, final norm; no hooks)
  over the same pre-tokenized calibration batches: the work ``profile`` cannot avoid;
- a plain forward pass of the whole CausalLM (decoder + LM head), what a user
  would run to "just do a forward pass";
- ``ray_prune.profile``: every (l, n) from one hooked pass per batch, including
  its own tokenization and the Gram products;
- the way public scripts compute it: for each block size n, a CausalLM pass with
  ``output_hidden_states=True`` that copies every hidden state to the host and
  then compares layer l with layer l+n. It is timed once (it is L times slower),
  over all L passes, or with ``--per-n-passes k`` over k of them (n = 1, ..., L
  evenly spread) scaled by L/k: every pass does the same work, the forward pass
  and the host copies, only the few cosines of its n differ;
then the ratios profile / decoder forward (target <= 1.10), profile / CausalLM
forward, and per-n / profile (the speed-up), and the peak memory of each way,
measured one way after another in a fresh process (the per-n peak is that of one of its L
passes, which all hold the same tensors).

    python benchmarks/profile_cost.py --models smollm2-135m gemma3-270m --samples 16 --max-length 256
"""

from __future__ import annotations

import argparse
import math

import torch

from timing import device_tag, interleaved_medians, machine, memory_unit, peak_memory_mib, verdict

TARGET = 1.10


def batches(tok, texts, batch_size, max_length, device):
    """The batches ``profile`` builds: texts sorted by length, right-padded, truncated."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    for i in range(0, len(order), batch_size):
        enc = tok([texts[j] for j in order[i:i + batch_size]], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_length)
        out.append((enc["input_ids"].to(device), enc["attention_mask"].to(device)))
    return out


@torch.inference_mode()
def decoder_forward(model, data):
    from ray_prune.core.architecture import decoder
    from ray_prune.core.profile import position_ids_from_mask

    body = decoder(model)
    for ids, mask in data:
        body(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)


@torch.inference_mode()
def causal_forward(model, data):
    for ids, mask in data:
        model(input_ids=ids, attention_mask=mask, use_cache=False)


@torch.inference_mode()
def per_n_on_host(model, data, num_layers, ns=None):
    """One pass per n; hidden states moved to the host; last-token angular distance per (l, l+n), summed."""
    from ray_prune.core.profile import last_token_index

    table = torch.zeros(num_layers + 1, num_layers + 1, dtype=torch.float64)
    for n in ns or range(1, num_layers + 1):
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


def memory(name: str, args) -> dict[str, tuple[float, float]]:
    setup = f"""
from profile_cost import batches, causal_forward, decoder_forward, per_n_on_host
from ray_prune.core.data import load_texts
from ray_prune.core.profile import profile
from ray_prune.core.models import load_model
model, tok = load_model({name!r})
texts = load_texts("calibration", {args.samples})
data = batches(tok, texts, {args.batch_size}, {args.max_length}, model.device)
L = model.config.num_hidden_layers
causal_forward(model, data[:1])  # warm-up: one-time allocations are not part of any way's peak
"""
    runs = {
        "decoder": "decoder_forward(model, data)",
        "causal": "causal_forward(model, data)",
        "profile": f"profile(model, tok, texts, batch_size={args.batch_size}, max_length={args.max_length}, "
                   "progress=False)",
        "per_n": "per_n_on_host(model, data, L, ns=[1])",
    }
    return peak_memory_mib(setup, runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-n-passes", type=int, default=0, help="time k of the L per-n passes and scale by L/k "
                    "(0: all L)")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory probe")
    args = ap.parse_args()

    from ray_prune.core.data import load_texts
    from ray_prune.core.profile import profile
    from ray_prune.core.models import load_model

    texts = load_texts("calibration", args.samples)
    print(f"# Profiling cost ({device_tag()})\n\n{machine()}; {args.samples} C4 calibration samples truncated to "
          f"{args.max_length} tokens, batch {args.batch_size}; median of {args.repeats} interleaved repeats "
          "(per-n: one run)\n")
    print("| model | L | dtype | tokens | decoder fwd s | CausalLM fwd s | profile s | **profile / decoder fwd** "
          "| profile / CausalLM fwd | per-n s | **per-n / profile** | max abs diff vs per-n |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    mem_rows, verdicts = [], []
    for name in args.models:
        model, tok = load_model(name)
        device = next(model.parameters()).device
        data = batches(tok, texts, args.batch_size, args.max_length, device)
        tokens = sum(int(mask.sum()) for _, mask in data)
        L = model.config.num_hidden_layers
        kept = {}

        def run_profile():
            kept["table"] = profile(model, tok, texts, batch_size=args.batch_size, max_length=args.max_length,
                                    progress=False)

        t = interleaved_medians({"decoder": lambda: decoder_forward(model, data),
                                 "causal": lambda: causal_forward(model, data),
                                 "profile": run_profile}, args.repeats)
        k = args.per_n_passes if 0 < args.per_n_passes < L else L
        ns = sorted({round(1 + i * (L - 1) / max(1, k - 1)) for i in range(k)})
        per_n = interleaved_medians({"per_n": lambda: kept.update(per_n=per_n_on_host(model, data, L, ns))},
                                    repeats=1, warmup=0)["per_n"] * L / len(ns)
        # Same distances both ways, except into x^L: HF's last hidden state is after the final norm, ours before.
        ours = kept["table"].distances
        theirs = (kept["per_n"] / args.samples).numpy()
        diff = max(abs(ours[l, l + n] - theirs[l, l + n]) for n in ns for l in range(L - n))
        per_n_note = "" if len(ns) == L else f" (est. from {len(ns)} of {L} passes)"
        ratio = t["profile"] / t["decoder"]
        verdicts.append((name, ratio))
        print(f"| {name} | {L} | {str(model.dtype).removeprefix('torch.')} | {tokens} | {t['decoder']:.2f} | "
              f"{t['causal']:.2f} | {t['profile']:.2f} | **{ratio:.2f}x** | {t['profile'] / t['causal']:.2f}x | "
              f"{per_n:.1f}{per_n_note} | **{per_n / t['profile']:.1f}x** | {diff:.1e} |", flush=True)
        del model, kept
        if not args.no_memory:
            mem_rows.append((name, memory(name, args)))

    print()
    for name, ratio in verdicts:
        print(f"- {name}: profile / plain decoder forward = {ratio:.2f}x, target <= {TARGET:.2f}x: "
              f"**{verdict(ratio, TARGET, at_least=False)}**")
    print("\nThe extra work of profile over the plain decoder pass is its own tokenization (the forward "
          "baselines get pre-tokenized batches), one hook per block that gathers B last-token vectors and "
          "normalises them, and one (L+1)x(L+1) Gram product per batch. The CausalLM forward also runs the LM "
          "head, which profile skips: that is why profile can be cheaper than a plain CausalLM pass.")
    if mem_rows:
        print(f"\nPeak memory ({memory_unit()}; model loaded = memory before the run, then the peak during it, "
              "and in brackets the rise above the loaded model):\n")
        print("| model | loaded | decoder fwd | CausalLM fwd | profile | per-n (one of its passes) |")
        print("|---|---|---|---|---|---|")
        for name, m in mem_rows:
            cells = " | ".join(f"{m[k][1]:.0f} (+{m[k][1] - m[k][0]:.0f})"
                               for k in ("decoder", "causal", "profile", "per_n"))
            print(f"| {name} | {m['profile'][0]:.0f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
