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

from ray_prune.core import dtypes
from ray_prune.core.distance import METRICS
from ray_prune.core.evaluation.tasks import DEFAULT_TASKS, TASKS
from ray_prune.core.select import STRATEGIES
from ray_prune.errors import UserError


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--dtype", default="auto", choices=list(dtypes.ALIASES),
                   help="auto (bf16 where the hardware runs it natively), bf16, fp16 or fp32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if data:
        p.add_argument("--data-dir", default=None,
                       help="local Parquet mirror (<dataset>/<split>.parquet); default $RAY_PRUNE_DATA_DIR, else the hub")


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=128, help="calibration documents (default 128)")
    p.add_argument("--metric", default="angular", choices=METRICS, help="distance: angular is the paper's")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024, help="tokens per calibration document")


def _heal_args(p: argparse.ArgumentParser) -> None:
    """One flag per HealConfig field (its default and reason as the help); --dtype is the common flag."""
    import dataclasses
    import typing

    from ray_prune.core.heal.config import HealConfig

    hints = typing.get_type_hints(HealConfig)
    for f in dataclasses.fields(HealConfig):
        if f.name == "dtype":
            continue
        flag = "--" + f.name.replace("_", "-")
        why = f"{f.metadata['why']} (default {f.default})"
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=why)
        elif f.name == "target":
            p.add_argument(flag, default=f.default, type=_targets, help=why + "; module names comma-separated")
        elif typing.get_origin(kind) is typing.Literal:
            p.add_argument(flag, default=f.default, choices=typing.get_args(kind), help=why)
        else:
            number = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
            p.add_argument(flag, default=f.default, type=number[0], help=why)


def _targets(text: str) -> str | list[str]:
    return text if text in ("ffn", "all-linear") else [t for t in text.replace(" ", "").split(",") if t]


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
    p.add_argument("--strategy", default="similarity", choices=STRATEGIES,
                   help="similarity (the paper's), deepest (its baseline) or layers (an explicit list)")
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
    _heal_args(p)
    p.add_argument("--resume", help="adapter checkpoint directory to continue from")
    p.add_argument("--merge", action="store_true", help="also save the adapter merged into the weights")
    _common(p)

    p = sub.add_parser("eval", help="lm-eval tasks and C4 validation loss / ln(V)")
    p.add_argument("model")
    p.add_argument("--adapter", help="LoRA adapter directory from `ray-prune heal`")
    p.add_argument("--out", required=True, help="JSON file for the scores")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated: {', '.join(TASKS)}; 'none' for loss only")
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
    from ray_prune.core.models import load_model

    return load_model(model or args.model, dtype=args.dtype, device=args.device,
                      trust_remote_code=args.trust_remote_code)


def _calibration(args, model, tok):
    from ray_prune.core.data import load_texts
    from ray_prune.core.profile import profile

    texts = load_texts("calibration", args.samples, data_dir_path=args.data_dir)
    return profile(model, tok, texts, metric=args.metric, batch_size=args.batch_size, max_length=args.max_length,
                   model_id=args.model, progress=not args.quiet)


def cmd_profile(args) -> int:
    from ray_prune.core.select import optimal_starts

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
    from ray_prune.core.architecture import num_layers
    from ray_prune.core.distance import DistanceTable
    from ray_prune.core.prune import prune_layers
    from ray_prune.core.select import layers_to_remove, n_from_fraction

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
    import dataclasses

    from ray_prune.core.heal.config import HealConfig

    return HealConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(HealConfig)})


def cmd_heal(args) -> int:
    from ray_prune.core.heal.lora import merge_adapter, prepare_for_healing
    from ray_prune.core.heal.loop import heal
    from ray_prune.core.models import load_tokenizer, resolve

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
    from ray_prune.core.evaluation.harness import evaluate
    from ray_prune.core.evaluation.tasks import resolve_tasks

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
    from ray_prune.sweep.experiment import load_experiment

    exp = load_experiment(args.experiment)
    if args.check:
        from ray_prune.sweep.plan import plan

        p = plan(exp, args.storage, args.rerun)
        print(f"{exp.name}: {len(p.cells)} cells ({len(p.pending)} to run) over "
              f"{', '.join(f'{m} (L={L})' for m, L in p.layers.items())} -> {p.storage.uri}")
        return 0
    from ray_prune.report.status import summary_table
    from ray_prune.sweep.run import run_sweep

    df = run_sweep(exp, storage=args.storage, rerun=args.rerun, progress=not args.quiet)
    print(summary_table(df))
    # Non-zero when a cell failed for good, so `ray job submit` and scripts see it; rerunning retries those cells.
    return 1 if (df["status"] == "failed").any() else 0


def cmd_report(args) -> int:
    from ray_prune.report.write import write_report

    index = write_report(args.storage, args.out)
    print(f"report -> {index}")
    return 0


def cmd_status(args) -> int:
    from ray_prune.report.status import status_report

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
