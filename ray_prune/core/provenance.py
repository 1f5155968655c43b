"""What an evaluation's numbers depend on besides the model and the settings that name its cell.

Numbers that cannot be reproduced are the complaint users of every evaluation tool make most often: the
lm-eval version, a task's prompt or version, the batch size, acc against acc_norm or the kernels changed
(lm-eval issues 614, 887 and 1625), and nothing recorded which. So every result row records them: the code
(the git commit of the checkout the package runs from, else its installed version), the library versions,
each task's config as lm-eval reads it (hashed), its shots and the metric the report reads, the evaluation's
batch size, seed and generation cap, the precision and quantization scored, the precision of the log-softmax
(``eval_logprobs``: fp32, or the model's dtype as lm-eval), and the device. The report and
``ray-prune status`` compare them across the rows they put side by side.

Everything here is cheap, needs no network and imports neither torch nor lm-eval (torch only to name a GPU,
where it is loaded already); what cannot change within a process is computed once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

import ray_prune
from ray_prune.core.evaluation.config import EvalConfig
from ray_prune.core.evaluation.tasks import TASKS, TASKS_DIR

# The libraries whose version changes scores: the harness, the model code, the kernels, the adapters, NF4.
LIBRARIES: tuple[str, ...] = ("lm_eval", "transformers", "torch", "peft", "bitsandbytes")

# The row values :func:`eval_provenance` returns, with their types (``ledger/schema.py`` makes them columns).
FIELDS: dict[str, type] = {
    "code_version": str,  # the git commit (+dirty: with uncommitted changes), or the package version + source hash
    **{f"{name}_version": str for name in LIBRARIES},  # null: not installed
    "eval_batch_size": int,  # sequences per forward pass: padding and kernel choice move scores slightly
    "eval_max_gen_toks": int,  # generation cap of generative tasks (null: each task's own)
    "eval_seed": int,  # which questions a limit samples, and the few-shot exemplars' order
    "eval_logprobs": str,  # the log-softmax's precision: "fp32" (ray-prune's) or "model" (the model's dtype, lm-eval's)
    "quantization": str,  # how the scored base was loaded: "nf4" or "none"
    "device_name": str,  # the GPU's name, or the CPU's model and the instruction sets that pick its kernels
}
# Per task of the registry, as ``<task>_<field>`` (the task's shots are ``<task>_shots``, beside its scores).
TASK_FIELDS: dict[str, type] = {
    "config_hash": str,  # the task's YAML as lm-eval reads it (includes merged, !function modules' code)
    "metric": str,  # the score the report reads for the task (its registry main_metric: acc, acc_norm, ...)
}
# CPU instruction sets that decide which GEMM kernels run, and so the rounding of every score.
CPU_FEATURES: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
HASH_CHARS = 16  # hex digits kept of a task config's SHA-256: enough to tell versions apart, short to read
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding ray_prune/: a checkout's root, or site-packages
CODE_VERSION_ENV = "RAY_PRUNE_CODE_VERSION"  # set by whoever runs a copy without .git (a Ray job) to the commit
SOURCE_SUFFIXES = (".py", ".yaml", ".html")  # the files whose content is the package's code, tasks and templates


def task_field(task: str, name: str) -> str:
    """The row key of a task's provenance value: ``boolq_config_hash``, ``mmlu_metric``."""
    return f"{task}_{name}"


def _git(root: Path, *args: str) -> str | None:
    """A git command's output in ``root``, or None where git is missing, fails or hangs. Optional locks are off, so
    reading the status never rewrites the index of a checkout others are working in."""
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                             env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def source_hash(package: Path | None = None) -> str:
    """The SHA-256 (first :data:`HASH_CHARS` hex digits) of the package's source files (``.py``, ``.yaml``,
    ``.html``, by relative path and content): what names the code where no commit can, as in a Ray job's
    uploaded copy of a checkout, which has no ``.git``. Not cached: :func:`code_version`, which is, calls it."""
    package = Path(package) if package is not None else Path(ray_prune.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:HASH_CHARS]


@functools.cache
def code_version(root: Path | None = None) -> str:
    """The code a row was computed with: ``$RAY_PRUNE_CODE_VERSION`` where set (a Ray job passes the submitting
    checkout's commit that way: its uploaded copy has no ``.git``); else the commit of the git checkout at ``root``
    (default: the one this package runs from), ``+dirty`` where tracked files differ from it, as
    ``git describe --dirty`` marks it; else (an installed package, a copy without ``.git``, no git) the package
    version and the hash of its source, so two different copies never share a name. Computed once per process:
    the code a process runs is the code it imported."""
    if os.environ.get(CODE_VERSION_ENV):
        return os.environ[CODE_VERSION_ENV]
    root = Path(root) if root is not None else PACKAGE_ROOT
    if (root / ".git").exists():
        head = _git(root, "rev-parse", "--verify", "HEAD")
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        if head and status is not None:
            return head.strip() + ("+dirty" if status.strip() else "")
    return f"{ray_prune.__version__}+src.{source_hash()}"


@functools.cache
def library_versions() -> dict[str, str | None]:
    """``{library: installed version}`` for :data:`LIBRARIES` (None: not installed), read from the installed
    packages' metadata, so nothing heavy is imported."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _cpu_name() -> str:
    """The CPU's model name and the instruction sets of :data:`CPU_FEATURES` it has (Linux: ``/proc/cpuinfo``)."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
                if model and flags:
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    isa = [f for f in CPU_FEATURES if f in flags]
    return f"{model} [{' '.join(isa)}]" if isa else model


@functools.cache
def device_name(device: str | None) -> str | None:
    """What ran a model placed on ``device`` ("cuda:0", "cpu", ...): the GPU's name (torch, which a process holding a
    model on a GPU has loaded), or the CPU's model and kernel-relevant instruction sets; None for no device."""
    if not device:
        return None
    kind, _, index = str(device).partition(":")
    if kind == "cpu":
        return _cpu_name()
    if kind == "cuda":
        try:
            import torch

            return torch.cuda.get_device_name(int(index) if index else None)
        except Exception:  # noqa: BLE001 - no driver or no such GPU: the row still gets written
            return "cuda (name unknown)"
    if kind == "mps":
        return f"Apple MPS ({platform.processor() or platform.machine()})"
    return str(device)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml where installed: MMLU is 58 files
    """lm-eval's YAML dialect, keeping each ``!function`` reference recognisable so its module's code is hashed."""


_Loader.add_constructor("!function", lambda loader, node: {"!function": loader.construct_scalar(node)})


def _config(path: Path) -> dict[str, Any]:
    """A task YAML as lm-eval reads it: the files it includes first, its own keys over theirs."""
    cfg = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    includes = cfg.pop("include", None)
    for name in [includes] if isinstance(includes, str) else includes or []:
        cfg = {**_config(path.parent / name), **cfg}
    return cfg


def _functions(value: Any) -> set[str]:
    """The modules of every ``!function`` reference in a config (``hub_schema`` of ``hub_schema.boolq``)."""
    if isinstance(value, dict):
        if set(value) == {"!function"}:
            return {str(value["!function"]).rsplit(".", 1)[0]}
        return set().union(*map(_functions, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(_functions, value)) if value else set()
    return set()


def _task_hash(folder: Path, task: str) -> str:
    """The hash of everything lm-eval reads to run ``task``: each of its lm-eval tasks' YAML (MMLU: 57 subjects,
    each with the template it includes), without ray-prune's own bookkeeping (``metadata.ray_prune``, which
    lm-eval ignores), and the code of the modules its ``!function`` references name. Comments and key order do
    not count; line endings do not either."""
    configs = {}
    for name in TASKS[task].lm_eval_tasks:
        cfg = _config(folder / f"{name}.yaml")
        meta = cfg.get("metadata")
        if isinstance(meta, dict) and "ray_prune" in meta:
            cfg["metadata"] = {k: v for k, v in meta.items() if k != "ray_prune"}
        configs[name] = cfg
    modules = {m: (folder / f"{m}.py").read_text(encoding="utf-8").replace("\r\n", "\n")
               for m in sorted(set().union(*map(_functions, configs.values())))}
    text = json.dumps({"tasks": configs, "modules": modules}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


_own_task_hash = functools.cache(functools.partial(_task_hash, TASKS_DIR))


def task_config_hashes(tasks: Iterable[str], folder: Path | None = None) -> dict[str, str]:
    """``{task: hash}`` of each task's config (see :func:`_task_hash`), from the package's task folder, or from
    ``folder``, a copy of it (each read anew; the package's own are read once per process)."""
    if folder is None:
        return {t: _own_task_hash(t) for t in tasks}
    return {t: _task_hash(Path(folder), t) for t in tasks}


def eval_provenance(eval_config: EvalConfig, eval_precision: str | None, quantization: str,
                    device: str | None) -> dict[str, Any]:
    """The provenance values of a row scored with ``eval_config`` (its tasks: the ones the row scored) in
    ``eval_precision`` (the rows' label: "bf16", "nf4+fp32"), with ``quantization`` ("nf4"/"none"), on ``device``:
    :data:`FIELDS`, ``eval_precision`` (a column of its own since before provenance), and per task of the config
    its shots and the :data:`TASK_FIELDS`."""
    shots = eval_config.shots()
    hashes = task_config_hashes(shots)
    out: dict[str, Any] = {
        "code_version": code_version(),
        **{f"{name}_version": v for name, v in library_versions().items()},
        "eval_batch_size": eval_config.batch_size, "eval_max_gen_toks": eval_config.max_gen_toks,
        "eval_seed": eval_config.seed, "eval_logprobs": eval_config.logprobs, "eval_precision": eval_precision,
        "quantization": quantization, "device_name": device_name(device),
    }
    for task, n in shots.items():
        out |= {f"{task}_shots": n, task_field(task, "config_hash"): hashes[task],
                task_field(task, "metric"): TASKS[task].main_metric}
    return out
