"""The ``ray-prune`` command line: one subparser per command. The flags of a step's settings are derived from its
settings object (``cli.flags``: ``CalibrationConfig`` for ``profile``/``prune``, ``HealConfig`` for ``heal``,
``EvalConfig`` for ``eval``); every flag has help and shows its default."""

from __future__ import annotations

import argparse

from ray_prune.cli.flags import add_settings
from ray_prune.core import dtypes
from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.cost import DEFAULT_GPU, GPU_TYPES
from ray_prune.core.evaluation.config import EvalConfig
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.select import REPAIR_FORMS, REPAIRS, STRATEGIES
from ray_prune.sweep.experiment import MAX_CELLS

MODEL_HELP = "hub id (org/name), a local directory written by save_pretrained, or a bundled name (smollm2-135m, " \
             "gemma3-270m)"
FORMAT = argparse.ArgumentDefaultsHelpFormatter


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--dtype", default="auto", choices=list(dtypes.ALIASES),
                   help="auto (bf16 where the hardware runs it natively), bf16, fp16 or fp32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (none: cuda if available)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if data:
        p.add_argument("--data-dir", default=None, help="local Parquet mirror (<dataset>/<split>.parquet); "
                       "none: $RAY_PRUNE_DATA_DIR, else the hub")


def _profile_parser(sub) -> None:
    p = sub.add_parser("profile", help="distance table d(x^l, x^{l+n}) for every l, n", formatter_class=FORMAT)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", required=True, help="Parquet file (or a dir, which gets distance.parquet)")
    add_settings(p, CalibrationConfig)
    _common(p)


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="remove layers and save an ordinary HF model (or a mergekit config)",
                       formatter_class=FORMAT)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--out", help="directory for save_pretrained output (required unless --mergekit-config)")
    p.add_argument("--mergekit-config", metavar="FILE", help="mergekit passthrough YAML dropping the same layers "
                   "(run: mergekit-yaml FILE OUT_DIR). Without --out, only it is written and no weights load unless "
                   "similarity must profile (no --table). dtype: --dtype's; auto omits it (keeps stored precision)")
    p.add_argument("--strategy", default="similarity", choices=STRATEGIES,
                   help="similarity (the paper's l*(n)), deepest (its baseline), block_influence (ShortGPT: the n "
                   "layers of lowest 1 - cos), greedy (SLEB: the removal order on the calibration loss) or layers "
                   "(an explicit list)")
    p.add_argument("--repair", default="none", choices=REPAIRS,
                   help="none (plain removal) or linear (ReplaceMe: a least-squares linear stand-in for each removed "
                   "run, fitted on the calibration text and folded into the weights before it; needs --out)")
    p.add_argument("--repair-form", choices=REPAIR_FORMS,
                   help="the linear repair's transform: full (d x d) or diagonal (per channel); default: full where "
                   "it folds exactly into the family's weights, else diagonal")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fraction", type=float, help="fraction of layers to remove, in [0, 1)")
    group.add_argument("--n", type=int, help="number of layers to remove")
    group.add_argument("--layers", type=_int_list, help="explicit layers, e.g. 20,21,24 (strategy layers)")
    p.add_argument("--table", help="distance table from `ray-prune profile` for similarity, or of metric "
                   "block_influence for that strategy (none: profile now, with the calibration flags below)")
    add_settings(p, CalibrationConfig)
    _common(p)


def _heal_parser(sub) -> None:
    p = sub.add_parser("heal", help="QLoRA-heal a pruned model on C4", formatter_class=FORMAT)
    p.add_argument("model", help="a pruned model directory (or any model: " + MODEL_HELP + ")")
    p.add_argument("--out", required=True, help="directory for the adapter (and merged/ with --merge)")
    add_settings(p, HealConfig)
    p.add_argument("--resume", help="adapter checkpoint directory to continue from")
    p.add_argument("--merge", action="store_true", help="also save the adapter merged into the weights")
    _common(p)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="lm-eval tasks and C4 validation loss / ln(V)", formatter_class=FORMAT)
    p.add_argument("model", help=MODEL_HELP + "; with --adapter, the model the adapter was trained on")
    p.add_argument("--adapter", help="LoRA adapter directory from `ray-prune heal` or a sweep (adapters/...): "
                                     "scored unmerged on its base, loaded and pruned as its record says")
    p.add_argument("--quantize", choices=["nf4", "none"], default=None,
                   help="load the base in NF4 (QLoRA) or full precision (none given: as the adapter was scored, "
                   "else full precision)")
    p.add_argument("--out", required=True, help="JSON file for the scores")
    add_settings(p, EvalConfig)
    _common(p)


def _sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="run an experiment YAML on Ray (local, or RAY_ADDRESS)", formatter_class=FORMAT)
    p.add_argument("experiment", help="an experiment file, e.g. experiments/smoke.yaml")
    p.add_argument("--storage", help="results root (local path, s3://, gs://); none: the file's storage")
    p.add_argument("--rerun", action="store_true", help="recompute every cell, even finished ones")
    p.add_argument("--check", action="store_true",
                   help="validate the experiment and print the grid, the memory plan and the cost plan; run nothing")
    p.add_argument("--gpu-memory-gb", type=float, default=None,
                   help="GPU memory for the memory plan (none: resources.gpu_memory_gb, else the --gpu-type's)")
    p.add_argument("--gpu-type", choices=list(GPU_TYPES), default=None,
                   help="GPU the cost plan prices with (none: the one the GPU memory identifies, else "
                   f"{DEFAULT_GPU})")
    p.add_argument("--price-per-gpu-hour", type=float, default=None, metavar="PRICE",
                   help="price of one GPU-hour: the cost plan prices the sweep with it")
    p.add_argument("--probe", action="store_true",
                   help="with --check: measure each model's rates on this machine's device (a few heal steps and "
                   "evaluation batches, cached under $RAY_PRUNE_CACHE/probes) instead of the published defaults")
    p.add_argument("--max-cells", type=int, default=MAX_CELLS, metavar="N",
                   help="refuse a grid of more cells than this (checked before anything is built)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="HTML page with the paper's figures and tables from a sweep's results",
                       formatter_class=FORMAT)
    p.add_argument("storage", help="the sweep's storage root (local, s3://, gs://)")
    p.add_argument("--out", help="output folder (none: <storage>/report for local storage)")


def _status_parser(sub) -> None:
    p = sub.add_parser("status", help="summary of a sweep's results, without Ray", formatter_class=FORMAT)
    p.add_argument("storage", help="the sweep's storage root (local, s3://, gs://)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ray-prune", description="Layer-pruning experiments on open-weight LLMs "
                                     "(Gromov et al.), one step per command, and sweeps on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_profile_parser, _prune_parser, _heal_parser, _eval_parser, _sweep_parser, _report_parser,
                _status_parser):
        add(sub)
    return parser
