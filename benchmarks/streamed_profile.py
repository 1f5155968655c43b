"""Layer-streamed profiling against the in-memory profile: same table, less memory, at what cost in time.

For each model, in fp32, on the same calibration set:
- the table difference (max abs) between ``profile_streamed`` (one block in
  memory at a time, read from the safetensors shards) and ``profile`` on the
  loaded model;
- the time of each (median of interleaved repeats, in one process): the
  in-memory way both with its model load (what a fresh profiling job pays) and
  without it, and the streamed way, which reads every block from its shard on
  each run; the ratios are the figures, not the absolute times;
- the peak memory of each way, each in a fresh process, less the memory of that
  process before it loads anything (tokenizer and texts are loaded before), so
  the figures are the method's own; beside them what the streamed peak should
  be near: one block, the activations of the calibration set, the embedding.

    python benchmarks/streamed_profile.py --models smollm2-135m gemma3-270m --samples 32 --max-length 256
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from timing import device_tag, interleaved_medians, machine, memory_unit, peak_memory_mib


def sizes_mib(name: str) -> dict[str, float]:
    """Bytes in fp32 of the whole checkpoint, its largest block and its embedding, read from the shard headers."""
    from safetensors import safe_open

    from ray_prune.core.profile_streamed import Shards, local_dir

    shards = Shards(local_dir(name))
    numel: dict[str, int] = {}
    for file in sorted(set(shards.files.values())):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                numel[key] = math.prod(f.get_slice(key).get_shape())
    blocks: dict[str, int] = {}
    for key, n in numel.items():
        parts = key.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            blocks[".".join(parts[:i + 2])] = blocks.get(".".join(parts[:i + 2]), 0) + n
    embedding = max(n for k, n in numel.items() if "embed" in k)
    return {"weights": sum(numel.values()) * 4 / 2**20, "block": max(blocks.values()) * 4 / 2**20,
            "embedding": embedding * 4 / 2**20}


def memory(name: str, args) -> dict[str, tuple[float, float]]:
    """Each way in its own fresh process; imports, tokenizer and texts come before the baseline."""
    setup = f"""
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from ray_prune.core.data import load_texts
from ray_prune.core.models import load_model, load_tokenizer, resolve
from ray_prune.core.profile import profile
from ray_prune.core.profile_streamed import profile_streamed
import accelerate, safetensors
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(resolve({name!r})))]  # import the model's code
tok = load_tokenizer({name!r})
texts = load_texts("calibration", {args.samples})
"""
    kw = f"batch_size={args.batch_size}, max_length={args.max_length}, progress=False"
    runs = {
        "in_memory": f"model, _ = load_model({name!r}, dtype='fp32'); profile(model, tok, texts, {kw}); del model",
        "streamed": f"profile_streamed({name!r}, tok, texts, dtype='fp32', {kw})",
    }
    out = {}
    for way, run in runs.items():  # one fresh process each: no way inherits another's heap
        out.update(peak_memory_mib(setup, {way: run}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    for flag, default in (("--samples", 32), ("--batch-size", 8), ("--max-length", 256), ("--repeats", 3)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory probes")
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    from ray_prune.core.data import load_texts
    from ray_prune.core.models import load_model, load_tokenizer

    hf_logging.disable_progress_bar()  # transformers' per-load bars would land in the printed section
    from ray_prune.core.profile import profile
    from ray_prune.core.profile_streamed import profile_streamed

    texts = load_texts("calibration", args.samples)
    kw = dict(batch_size=args.batch_size, max_length=args.max_length, progress=False)
    command = " ".join(["python", f"benchmarks/{Path(__file__).name}", *sys.argv[1:]])
    print(f"# Layer-streamed profiling ({device_tag()})\n\n{machine()}; `{command}`; {args.samples} C4 calibration "
          f"samples truncated to {args.max_length} tokens, batch {args.batch_size}, fp32, metric angular; median of "
          f"{args.repeats} interleaved repeats\n")
    print("| model | L | tokens | max abs diff | load + profile s | profile (loaded) s | streamed s "
          "| **streamed / (load + profile)** | streamed / profile |")
    print("|---|---|---|---|---|---|---|---|---|")
    mem_rows = []
    for name in args.models:
        tok = load_tokenizer(name)
        kept = {}

        def load_and_profile():
            model, _ = load_model(name, dtype="fp32")
            kept["memory"] = profile(model, tok, texts, **kw)

        def streamed():
            kept["streamed"] = profile_streamed(name, tok, texts, dtype="fp32", **kw)

        loaded, _ = load_model(name, dtype="fp32")
        t = interleaved_medians({"load": load_and_profile, "profile": lambda: profile(loaded, tok, texts, **kw),
                                 "streamed": streamed}, args.repeats)
        del loaded
        a, b = kept["memory"], kept["streamed"]
        diff = float(abs(a.distances - b.distances).max())
        print(f"| {name} | {a.num_layers} | {a.tokens} | {diff:.1e} | {t['load']:.2f} | {t['profile']:.2f} | "
              f"{t['streamed']:.2f} | **{t['streamed'] / t['load']:.2f}x** | {t['streamed'] / t['profile']:.2f}x |",
              flush=True)
        if not args.no_memory:
            mem_rows.append((name, memory(name, args), sizes_mib(name), activations_mib(name, tok, texts, args)))

    if mem_rows:
        print(f"\nPeak memory ({memory_unit()}, the rise above the same fresh process before it loads the model); "
              "the streamed peak should be near one block + the activations + the embedding:\n")
        print("| model | fp32 weights | in-memory peak | streamed peak | **streamed / in-memory** | one block "
              "| embedding | activations |")
        print("|---|---|---|---|---|---|---|---|")
        for name, m, size, acts in mem_rows:
            mem = m["in_memory"][1] - m["in_memory"][0]
            st = m["streamed"][1] - m["streamed"][0]
            print(f"| {name} | {size['weights']:.0f} | {mem:.0f} | {st:.0f} | **{st / mem:.2f}x** | "
                  f"{size['block']:.1f} | {size['embedding']:.0f} | {acts:.0f} |", flush=True)
    print("\nThe streamed way reads every block from its shard once per run, so it pays the read of the whole "
          "checkpoint as the in-memory way does when it loads; it skips the LM head and the final norm. Its "
          "activations (every batch's hidden states at once) are what grows with the calibration set. On a CPU "
          "both ways map the safetensors file rather than copy it, so only the pages a run touches are resident: "
          "of the embedding, the rows of the calibration tokens (which is why a peak can be below the "
          "embedding's size); on a GPU the whole embedding is copied to the device.")

def activations_mib(name: str, tok, texts, args) -> float:
    """fp32 hidden states of every padded batch, which the streamed way holds all at once."""
    from transformers import AutoConfig

    from ray_prune.core.models import resolve
    from ray_prune.core.profile import encode, length_sorted_batches

    hidden = AutoConfig.from_pretrained(resolve(name)).hidden_size
    cells = sum(ids.numel() for ids, _ in (encode(tok, texts, idx, args.max_length, "cpu")
                                           for idx in length_sorted_batches(texts, args.batch_size)))
    return cells * hidden * 4 / 2**20


if __name__ == "__main__":
    main()
