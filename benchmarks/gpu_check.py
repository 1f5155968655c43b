"""The GPU checks of the paper-scale path, in one short run: measured peak memory per stage against the plan.

CI and the development machines have no GPU; this is the script to run where one is lent (one call, a few
minutes on one H200 for a bundled model). For each stage of one cell it records the peak CUDA memory
(``torch.cuda.max_memory_allocated`` over the stage, less what was allocated before it) beside
``core.memory.estimate`` for the same model and settings, and the ratio measured/estimated: the plan is
useful if the ratios sit a little below 1 (it errs on the side of fitting). It also measures, on the GPU in
bf16, what the merge question is about: the healed C4 loss of the unmerged adapter on the NF4 base (what rows
report), of the adapter merged into bf16 weights (the old path) and merged with fp32 arithmetic.

    python benchmarks/gpu_check.py --models smollm2-135m gemma3-270m --fraction 0.25 --steps 30 --sweep

``--sweep`` then runs ``experiments/smoke.yaml`` on CUDA through ``ray-prune sweep`` (bf16 compute, the
bitsandbytes CUDA NF4 base) into a temporary storage and checks that every cell finished. Prints Markdown
tables; exits 2 with a message where there is no CUDA device, 1 if the sweep leaves a cell unfinished. Sized
for one call of a lent machine: about 5 minutes on one H200 once the packages are installed (see
../shared/GPU.md for how they travel there).
"""

from __future__ import annotations

import argparse
import sys
import time


def _stage(name: str, fn, rows: list, estimate_gib: float):
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    rows.append((name, time.perf_counter() - t, peak, estimate_gib))
    return out


def _bf16_merge(name: str, remove, cfg, peft_model):
    """The adapter merged as healed rows once were scored: ``w += delta`` in bf16 on a bf16 reload of the base."""
    import dataclasses

    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from ray_prune import load_model, prune_layers
    from ray_prune.core.heal.lora import prepare_for_healing

    base, _ = load_model(name, dtype="bf16")
    prune_layers(base, remove)
    twin = prepare_for_healing(base, dataclasses.replace(cfg, quantize="none", dtype="bf16"))
    set_peft_model_state_dict(twin, get_peft_model_state_dict(peft_model))
    return twin.merge_and_unload().eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--calibration", type=int, default=64)
    ap.add_argument("--sweep", action="store_true", help="then run experiments/smoke.yaml through ray-prune sweep")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (see benchmarks/RESULTS.md)")
        return 2
    for model in args.models:
        check_model(model, args)
    return _sweep() if args.sweep else 0


def _sweep() -> int:
    """The smoke experiment through the CLI on this GPU; 1 unless every cell finished."""
    import subprocess
    import tempfile

    from ray_prune.ledger.rows import load_results

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rc = subprocess.call(["ray-prune", "sweep", "experiments/smoke.yaml", "--storage", tmp])
        df = load_results(tmp)
        wall = time.perf_counter() - t
        counts = df.groupby(["stage", "status"]).size().to_dict()
        print(f"\nsmoke sweep on CUDA: exit {rc}, {wall:.0f} s, rows {counts}, "
              f"devices {sorted(set(df['device'].dropna()))}, "
              f"eval precision {sorted(set(df['eval_precision'].dropna()))}")
        return 0 if rc == 0 and set(df["status"]) == {"finished"} else 1


def check_model(name: str, args) -> None:
    """Measured peak per stage of one cell of ``name`` beside the plan, and the healed losses by merge path."""
    import torch

    from ray_prune import evaluate, heal, layers_to_remove, load_model, load_texts, profile, prune_layers
    from ray_prune.core.calibration import CalibrationConfig
    from ray_prune.core.evaluation.config import EvalConfig, TaskSettings
    from ray_prune.core.heal.config import HealConfig
    from ray_prune.core.heal.lora import merge_adapter
    from ray_prune.core.loss import c4_loss
    from ray_prune.core.memory import Workload, estimate
    from ray_prune.core.model_configs import load_config
    from ray_prune.core.select import n_from_fraction

    config = load_config(name).config
    n = n_from_fraction(args.fraction, config.num_hidden_layers)
    cfg = HealConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, quantize="nf4",
                     eval_every=args.steps, val_sequences=8, warmup_steps=max(1, args.steps // 10))
    evaluation = EvalConfig(tasks={"boolq": TaskSettings(shots=0)}, limit=200, c4_sequences=16, seq_len=args.seq_len,
                            batch_size=8)
    work = Workload(dtype="bf16", calibration=CalibrationConfig(samples=args.calibration, max_length=args.seq_len,
                                                                batch_size=8),
                    evaluation=evaluation, heal=(cfg,))

    def gib(stage: str, precision: str = "auto", removed: int = n) -> float:
        return estimate(config, work, stage, precision=precision, n_removed=removed).peak_gib

    rows: list = []
    texts = load_texts("calibration", args.calibration)
    model, tok = load_model(name, dtype="bf16")
    table = _stage("profile (bf16)", lambda: profile(model, tok, texts, batch_size=8, max_length=args.seq_len,
                                                     progress=False), rows, gib("profile", "bf16", 0))
    remove = layers_to_remove("similarity", table.num_layers, n=n, table=table)
    prune_layers(model, remove)
    _stage("unhealed eval (bf16)", lambda: evaluate(model, tok, evaluation, progress=False),
           rows, gib("unhealed", "bf16"))
    model = None  # free the bf16 copy before the NF4 load
    torch.cuda.empty_cache()
    base, tok = load_model(name, dtype="bf16", quantize="nf4", purpose="training")
    prune_layers(base, remove)
    peft_model, reports = _stage("heal (nf4 + LoRA)", lambda: heal(base, tok, cfg, progress=False), rows,
                                 gib("heal"))
    losses = {}
    losses["unmerged, NF4 base"] = _stage(
        "healed eval (nf4, unmerged)", lambda: c4_loss(peft_model, tok, num_sequences=16, seq_len=args.seq_len),
        rows, gib("healed", "nf4"))["loss"]
    losses["merged with fp32 arithmetic"] = c4_loss(merge_adapter(peft_model, dtype=torch.bfloat16), tok,
                                                     num_sequences=16, seq_len=args.seq_len)["loss"]
    losses["merged into bf16 weights (the old path)"] = c4_loss(_bf16_merge(name, remove, cfg, peft_model),
                                                                tok, num_sequences=16, seq_len=args.seq_len)["loss"]
    print(f"## GPU check: {name}, n={n} of {config.num_hidden_layers} removed "
          f"({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    print("| stage | s | measured peak GiB | planned GiB | measured / planned |\n|---|---|---|---|---|")
    for stage, seconds, peak, planned in rows:
        print(f"| {stage} | {seconds:.1f} | {peak:.2f} | {planned:.2f} | {peak / planned:.2f} |")
    print(f"\nheal: {args.steps} steps of {args.batch} x {args.seq_len}, val loss {reports[-1].val_loss:.4f}\n")
    print("| healed model | C4 loss |\n|---|---|")
    for label, value in losses.items():
        print(f"| {label} | {value:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
