"""``ray-prune``: one subcommand per step of the method, plus the sweep and its status.

Each step reads what the previous one wrote (a distance table, a saved model,
an adapter), so they compose in shell scripts as well as in the sweep. Bad
input exits 2 with a one-line message and a fix; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from ray_prune.errors import UserError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--dtype", default="auto", help="auto (bf16 where fast), bf16, fp16 or fp32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if data:
        p.add_argument("--data-dir", default=None,
                       help="local Parquet mirror (<dataset>/<split>.parquet); default $RAY_PRUNE_DATA_DIR, else the hub")


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=128, help="calibration documents (default 128)")
    p.add_argument("--metric", default="angular", help="angular (paper), angular_all or block_influence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024, help="tokens per calibration document")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-prune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="distance table d(x^l, x^{l+n}) for every l, n")
    p.add_argument("model", help="hub id, local HF dir, or bundled name (smollm2-135m, gemma3-270m)")
    p.add_argument("--out", required=True, help="Parquet file (or a dir, which gets distance.parquet)")
    _profile_args(p)
    _common(p)

    p = sub.add_parser("prune", help="remove layers and save an ordinary HF model")
    p.add_argument("model")
    p.add_argument("--out", required=True, help="directory for save_pretrained output")
    p.add_argument("--strategy", default="similarity", help="similarity (paper), deepest (baseline) or layers")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fraction", type=float, help="fraction of layers to remove, in [0, 1)")
    group.add_argument("--n", type=int, help="number of layers to remove")
    group.add_argument("--layers", type=_int_list, help="explicit layers, e.g. 20,21,24 (strategy layers)")
    p.add_argument("--table", help="distance table from `ray-prune profile` (else profiled now)")
    _profile_args(p)
    _common(p)

    p = sub.add_parser("heal", help="QLoRA-heal a pruned model on C4")
    p.add_argument("model", help="a pruned model directory (or any model)")
    p.add_argument("--out", required=True, help="directory for the adapter (and merged/ with --merge)")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--target", default="ffn", help="ffn (paper), all-linear, or comma-separated module names")
    p.add_argument("--quantize", default="nf4", help="nf4 (QLoRA, paper) or none (plain LoRA)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-sequences", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="adapter checkpoint directory to continue from")
    p.add_argument("--merge", action="store_true", help="also save the adapter merged into the weights")
    _common(p)

    p = sub.add_parser("eval", help="lm-eval tasks and C4 validation loss / ln(V)")
    p.add_argument("model")
    p.add_argument("--adapter", help="LoRA adapter directory from `ray-prune heal`")
    p.add_argument("--out", required=True, help="JSON file for the scores")
    p.add_argument("--tasks", default="mmlu,boolq", help="comma-separated: mmlu, boolq, arc_easy, arc_challenge, "
                                                         "hellaswag, piqa, winogrande; 'none' for loss only")
    p.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--c4-sequences", type=int, default=64, help="held-out C4 blocks for the loss (0: skip)")
    p.add_argument("--seq-len", type=int, default=1024)
    _common(p)

    p = sub.add_parser("sweep", help="run an experiment YAML on Ray (local, or RAY_ADDRESS)")
    p.add_argument("experiment", help="experiments/*.yaml")
    p.add_argument("--storage", help="results root (local path, s3://, gs://); overrides the file's storage")
    p.add_argument("--rerun", action="store_true", help="recompute every cell, even finished ones")
    p.add_argument("--check", action="store_true", help="validate the experiment and print the plan; run nothing")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("report", help="HTML page with the paper's figures and tables from a sweep's results")
    p.add_argument("storage", help="the sweep's storage root (local, s3://, gs://)")
    p.add_argument("--out", help="output folder (default: <storage>/report for local storage)")

    p = sub.add_parser("status", help="summary of a sweep's results, without Ray")
    p.add_argument("storage", help="the sweep's storage root")

    return parser


def _load(args, model: str | None = None):
    from ray_prune.models import load_model

    return load_model(model or args.model, dtype=args.dtype, device=args.device,
                      trust_remote_code=args.trust_remote_code)


def _calibration(args, model, tok):
    from ray_prune.data import load_texts
    from ray_prune.distance import profile

    texts = load_texts("calibration", args.samples, data_dir_path=args.data_dir)
    return profile(model, tok, texts, metric=args.metric, batch_size=args.batch_size, max_length=args.max_length,
                   model_id=args.model, progress=not args.quiet)


def cmd_profile(args) -> int:
    from ray_prune.select import optimal_starts

    model, tok = _load(args)
    table = _calibration(args, model, tok)
    out = Path(args.out)
    path = table.save(out / "distance.parquet" if out.suffix != ".parquet" else out)
    print(f"{table.model_id}: {table.num_layers} layers, metric {table.metric}, {table.samples} samples, "
          f"{table.tokens} tokens -> {path}")
    print("  n  l*(n)  d")
    for n, l, d in optimal_starts(table):
        print(f"{n:3d}  {l:5d}  {d:.4f}")
    return 0


def cmd_prune(args) -> int:
    from ray_prune.architecture import num_layers
    from ray_prune.distance import DistanceTable
    from ray_prune.prune import prune_layers
    from ray_prune.select import layers_to_remove, n_from_fraction

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"output directory {out} is not empty", "choose a new --out or remove it")
    if args.fraction is not None and not 0.0 <= args.fraction < 1.0:  # fail before loading anything
        raise UserError(f"fraction {args.fraction} is outside [0, 1)", "use a fraction of layers such as 0.25")
    model, tok = _load(args)
    L = num_layers(model)
    n = n_from_fraction(args.fraction, L) if args.fraction is not None else args.n
    table = None
    if args.strategy == "similarity":
        table = DistanceTable.load(args.table) if args.table else _calibration(args, model, tok)
    remove = layers_to_remove(args.strategy, L, n=n, table=table, layers=args.layers)
    prune_layers(model, remove)
    model.config.layer_pruning["strategy"] = args.strategy
    _save_model(model, tok, out)
    print(f"removed {len(remove)} of {L} layers {remove} ({args.strategy}) -> {out}")
    return 0


def _save_model(model, tok, out: Path) -> None:
    """save_pretrained into a temp dir, then rename: no half-written model directories."""
    import shutil
    import tempfile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _heal_config(args):
    from ray_prune.heal import HealConfig

    target = args.target if args.target in ("ffn", "all-linear") else args.target.split(",")
    return HealConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len,
                      lr=args.lr, rank=args.rank, warmup_steps=args.warmup_steps, target=target,
                      quantize=args.quantize, eval_every=args.eval_every, val_sequences=args.val_sequences,
                      seed=args.seed, dtype=args.dtype)


def cmd_heal(args) -> int:
    from ray_prune.heal import heal, merge_adapter, prepare_for_healing
    from ray_prune.models import load_tokenizer, resolve

    config = _heal_config(args)
    config.validate()
    tok = load_tokenizer(args.model, args.trust_remote_code)
    model = prepare_for_healing(resolve(args.model), config, device=args.device)

    def show(r) -> None:
        print(f"step {r.step:5d}  train {r.train_loss:.4f}  val {r.val_loss:.4f}  tokens {r.tokens_seen}")

    out = Path(args.out)
    model, reports = heal(model, tok, config, callback=show, checkpoint_dir=out, resume_from=args.resume,
                          data_dir=args.data_dir, progress=not args.quiet)
    if args.merge:
        _save_model(merge_adapter(model), tok, out / "merged")
    print(f"adapter -> {out}" + (f", merged model -> {out / 'merged'}" if args.merge else ""))
    return 0


def _with_adapter(model, adapter: str | None):
    if not adapter:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter).eval()


def cmd_eval(args) -> int:
    from ray_prune.evaluate import evaluate

    from ray_prune.evaluate import resolve_tasks

    tasks = [] if args.tasks.strip() in ("", "none") else [t.strip() for t in args.tasks.split(",")]
    if tasks:
        resolve_tasks(tasks)  # unknown tasks fail before anything loads
    model, tok = _load(args)
    model = _with_adapter(model, args.adapter)
    scores = evaluate(model, tok, tasks=tasks, limit=args.limit, data_dir=args.data_dir,
                      c4_sequences=args.c4_sequences, seq_len=args.seq_len, batch_size=args.batch_size,
                      progress=not args.quiet)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(scores, indent=2))
    tmp.replace(out)
    for k, v in scores.items():
        print(f"{k:28s} {v:.4f}" if isinstance(v, float) else f"{k:28s} {v}")
    return 0


def cmd_sweep(args) -> int:
    from ray_prune.experiment import load_experiment

    exp = load_experiment(args.experiment)
    if args.check:
        from ray_prune.sweep import plan

        p = plan(exp, args.storage, args.rerun)
        print(f"{exp.name}: {len(p['cells'])} cells ({len(p['pending'])} to run) over "
              f"{', '.join(f'{m} (L={L})' for m, L in p['layers'].items())} -> {p['storage'].uri}")
        return 0
    from ray_prune.status import summary_table
    from ray_prune.sweep import run_sweep

    df = run_sweep(exp, storage=args.storage, rerun=args.rerun, progress=not args.quiet)
    print(summary_table(df))
    # Non-zero when a cell failed for good, so `ray job submit` and scripts see it; rerunning retries those cells.
    return 1 if (df["status"] == "failed").any() else 0


def cmd_report(args) -> int:
    from ray_prune.report import write_report

    index = write_report(args.storage, args.out)
    print(f"report -> {index}")
    return 0


def cmd_status(args) -> int:
    from ray_prune.status import status_report

    print(status_report(args.storage))
    return 0


COMMANDS = {"sweep": cmd_sweep, "status": cmd_status, "report": cmd_report, "profile": cmd_profile, "prune": cmd_prune, "heal": cmd_heal, "eval": cmd_eval}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"ray-prune {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
