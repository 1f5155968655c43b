"""The ``ray-prune`` command line: one subparser per command, flags derived from their owners where they have one
(``HealConfig`` for ``heal``, the task registry, the metric, strategy and dtype names)."""

from __future__ import annotations

import argparse

from ray_prune.core import dtypes
from ray_prune.core.distance import METRICS
from ray_prune.core.evaluation.tasks import DEFAULT_TASKS, TASKS
from ray_prune.core.select import STRATEGIES


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


def _profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="distance table d(x^l, x^{l+n}) for every l, n")
    p.add_argument("model", help="hub id, local HF dir, or bundled name (smollm2-135m, gemma3-270m)")
    p.add_argument("--out", required=True, help="Parquet file (or a dir, which gets distance.parquet)")
    _profile_args(p)
    _common(p)


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="remove layers and save an ordinary HF model (or a mergekit config)")
    p.add_argument("model")
    p.add_argument("--out", help="directory for save_pretrained output (required unless --mergekit-config)")
    p.add_argument("--mergekit-config", metavar="FILE", help="mergekit passthrough YAML dropping the same layers "
                   "(run: mergekit-yaml FILE OUT_DIR). Without --out, only it is written and no weights load unless "
                   "similarity must profile (no --table). dtype: --dtype's; auto omits it (keeps stored precision)")
    p.add_argument("--strategy", default="similarity", choices=STRATEGIES,
                   help="similarity (the paper's), deepest (its baseline) or layers (an explicit list)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fraction", type=float, help="fraction of layers to remove, in [0, 1)")
    group.add_argument("--n", type=int, help="number of layers to remove")
    group.add_argument("--layers", type=_int_list, help="explicit layers, e.g. 20,21,24 (strategy layers)")
    p.add_argument("--table", help="distance table from `ray-prune profile` (else profiled now)")
    _profile_args(p)
    _common(p)


def _heal_parser(sub) -> None:
    p = sub.add_parser("heal", help="QLoRA-heal a pruned model on C4")
    p.add_argument("model", help="a pruned model directory (or any model)")
    p.add_argument("--out", required=True, help="directory for the adapter (and merged/ with --merge)")
    _heal_args(p)
    p.add_argument("--resume", help="adapter checkpoint directory to continue from")
    p.add_argument("--merge", action="store_true", help="also save the adapter merged into the weights")
    _common(p)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="lm-eval tasks and C4 validation loss / ln(V)")
    p.add_argument("model")
    p.add_argument("--adapter", help="LoRA adapter directory from `ray-prune heal` or a sweep (adapters/...): "
                                     "scored unmerged on its base, loaded and pruned as its record says")
    p.add_argument("--quantize", choices=["nf4", "none"], default=None,
                   help="load the base in NF4 (QLoRA) or full precision (default: as the adapter was scored, else none)")
    p.add_argument("--out", required=True, help="JSON file for the scores")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                   help=f"comma-separated: {', '.join(TASKS)}; 'none' for loss only")
    p.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--c4-sequences", type=int, default=64, help="held-out C4 blocks for the loss (0: skip)")
    p.add_argument("--seq-len", type=int, default=1024)
    _common(p)


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run an experiment YAML on Ray (local, or RAY_ADDRESS)")
    p.add_argument("experiment", help="experiments/*.yaml")
    p.add_argument("--storage", help="results root (local path, s3://, gs://); overrides the file's storage")
    p.add_argument("--rerun", action="store_true", help="recompute every cell, even finished ones")
    p.add_argument("--check", action="store_true",
                   help="validate the experiment and print the grid and the memory plan; run nothing")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GPU memory for the memory plan (default: resources.gpu_memory_gb)")
    p.add_argument("--quiet", action="store_true")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="HTML page with the paper's figures and tables from a sweep's results")
    p.add_argument("storage", help="the sweep's storage root (local, s3://, gs://)")
    p.add_argument("--out", help="output folder (default: <storage>/report for local storage)")


def _status_parser(sub) -> None:
    p = sub.add_parser("status", help="summary of a sweep's results, without Ray")
    p.add_argument("storage", help="the sweep's storage root")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-prune", description="Layer-pruning experiments on open-weight LLMs (Gromov et al.), one step per command, and sweeps on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_profile_parser, _prune_parser, _heal_parser, _eval_parser, _sweep_parser, _report_parser,
                _status_parser):
        add(sub)
    return parser


