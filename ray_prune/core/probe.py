"""Measured rates for the cost plan: a few heal steps and evaluation batches of a model on the device that runs it.

:func:`probe` loads the model as a sweep trial loads it (the scoring precision, ``core.memory.Workload.
scored_precision``), times the load, a forward over packed blocks at the evaluation's shape (``forward``: the C4
and heal losses), the continuation scorer on questions shaped like the experiment's (``score``: random contexts of
the tasks' mean length, four one-token answers, ``core.evaluation.loglikelihood``), the decoder without its head in
the experiment's full-precision dtype at the calibration shape (``table``: the distance table), and heal steps at
the heal micro-batch through ``core.heal.loop.heal`` itself (``train``), and turns each into the
rate ``core.cost`` prices with: FLOPs (counted by ``core.cost``) over seconds, parameters over seconds for the load.
Token ids are random, so it needs no data, only the weights.

Each measurement is sized to the device: a first small pass estimates the speed, then as many rows as fit a few
seconds, up to the experiment's batch (a GPU runs the whole batch; a CPU a row or two), and a first step or batch
is never timed (allocations, kernel selection). The result is cached as JSON under the ray-prune cache
(``$RAY_PRUNE_CACHE/probes``), per (model, device name, precision), so it is paid once; ``force`` measures again.
It imports no Ray: on a cluster the sweep calls it inside a task on a trial's node, the one place whose speed
matters; ``ray-prune sweep --check --probe`` calls it here.
"""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ray_prune.core.memory.workload import Workload

PROBE_DIR = "probes"  # under core.bundled.cache_dir()
SLICE_S = 2.0  # seconds each timed pass aims for, after a short untimed and a short estimating pass
REPEATS = 2  # timed passes of each measurement: the fastest counts (a shared machine's interference only slows)
MIN_TOKENS = 64  # the shortest row a measurement shortens a sequence to on a slow device
HEAL_STEPS = 3  # the first is not timed; the fastest of the others counts


@dataclass(frozen=True)
class Probe:
    """Measured rates of one model on one device, in one precision: FLOP/s per kind, parameters/s for ``load``."""

    model: str
    device: str
    precision: str
    rates: dict[str, float]
    how: dict[str, str]  # kind -> what was measured (shape, seconds)
    measured_at: str
    cached: bool = False
    path: str = ""


def device_name(device: Any) -> str:
    """A device as a cache key: the GPU's name, or the CPU's with the threads torch uses."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine() or "cpu"
    return f"cpu {cpu} x{torch.get_num_threads()} threads"


def precision_of(workload: Workload, device: Any) -> tuple[str, str, str]:
    """(scoring quantization, heal quantization, compute dtype) as the trial runs them on ``device``."""
    import torch

    from ray_prune.core import dtypes

    scored = "nf4" if workload.scored_precision() == "nf4" else "none"
    heal = workload.heal[0].quantize if workload.heals else scored
    # sweep.scoring: rows scored as trained compute in the training dtype, else in the inference one
    purpose = "training" if workload.eval_precision == "trained" and workload.heals else "inference"
    dtype = dtypes.short_name(dtypes.to_torch(workload.dtype, torch.device(device), purpose))
    return scored, heal, dtype


def cache_path(model: str, device: str, precision: str) -> Path:
    from ray_prune.core.bundled import cache_dir

    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"{model}--{device}--{precision}").strip("_")
    return cache_dir() / PROBE_DIR / f"{slug}.json"


def cached(model: str, workload: Workload, device: Any = None) -> Probe | None:
    """The cached probe of ``model`` on ``device`` in the workload's precision, if there is one."""
    from ray_prune.core.models import default_device

    dev = device if device is not None else default_device()
    scored, heal, dtype = precision_of(workload, dev)
    path = cache_path(model, device_name(dev), _precision_key(scored, heal, dtype))
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Probe(**{**data, "cached": True, "path": str(path)})


def _precision_key(scored: str, heal: str, dtype: str) -> str:
    return f"{scored}+{dtype}" + ("" if heal == scored else f", heal {heal}")


def _timed(run, flops, rows_wanted: int, length: int) -> tuple[float, int, int, float]:
    """(FLOP/s, rows, tokens per row, seconds) of ``run(rows, length)``: a short untimed pass (allocations, kernel
    choice), a short timed one that estimates the speed, then the measurement, as many rows (up to
    ``rows_wanted``: a few batches, so that a GPU's timing is more than a kernel launch) as fit about
    :data:`SLICE_S` seconds, each row shortened (not below :data:`MIN_TOKENS`) where one full row would not fit,
    :data:`REPEATS` times, the fastest counted. ``flops(rows, length)`` counts the work of a call."""
    short = min(length, MIN_TOKENS)
    run(1, min(short, 16))
    t = time.perf_counter()
    run(1, short)
    per_token = max(time.perf_counter() - t, 1e-6) / short  # fixed costs included: an over-estimate
    budget = int(SLICE_S / per_token)
    rows = max(1, min(rows_wanted, budget // length))
    length = min(length, max(short, budget))
    seconds = float("inf")
    for _ in range(REPEATS):
        t = time.perf_counter()
        run(rows, length)
        seconds = min(seconds, max(time.perf_counter() - t, 1e-9))
    return flops(rows, length) / seconds, rows, length, seconds


def weights_here(model: str) -> bool:
    """Whether ``model``'s weights are on this machine: a bundled name or a local directory, or a hub id whose
    safetensors the Hugging Face cache holds."""
    from huggingface_hub import try_to_load_from_cache

    from ray_prune.core.bundled import BUNDLED
    from ray_prune.core.model_configs import model_dir

    if model in BUNDLED or model_dir(model) is not None:
        return True
    return any(isinstance(try_to_load_from_cache(model, name), str)
               for name in ("model.safetensors.index.json", "model.safetensors"))


def probe(model: str, workload: Workload, device: Any = None, trust_remote_code: bool = False,
          force: bool = False, use_cache: bool = True, download: bool = False) -> Probe:
    """Measure (or read from the cache) the rates of ``model`` on ``device`` (None: the default device) for the
    kinds of work ``workload`` asks for, as a sweep trial runs them (module docstring). ``download``: fetch weights
    that are not on this machine (a cluster node that will run the trials anyway); without it such a model is
    refused, so that a laptop's ``--check --probe`` never starts a 140 GB download."""
    import torch

    from ray_prune.core import cost
    from ray_prune.core.loss import next_token_loss
    from ray_prune.core.memory.arch import Arch, param_count
    from ray_prune.core.models import default_device, load_model

    dev = torch.device(device) if device is not None else default_device()
    if use_cache and not force:
        hit = cached(model, workload, dev)
        if hit is not None:
            return hit
    if not download and not weights_here(model):
        from ray_prune.errors import UserError

        raise UserError(f"the weights of {model} are not on this machine, and a probe measures them",
                        "probe where the trials run (or download them first); the plan uses the default rates")
    scored, heal_quantize, dtype = precision_of(workload, dev)
    name, precision = device_name(dev), _precision_key(scored, heal_quantize, dtype)
    rates: dict[str, float] = {}
    how: dict[str, str] = {}
    gen = torch.Generator().manual_seed(0)

    _imports(scored)
    t = time.perf_counter()
    net, tok = load_model(model, dtype=dtype, device=dev, quantize=scored, trust_remote_code=trust_remote_code)
    load_s = time.perf_counter() - t
    arch = Arch.from_config(net.config)
    params = param_count(arch).total()
    rates["load"] = params / load_s
    how["load"] = f"{params / 1e6:.0f}M parameters in {load_s:.1f} s"
    vocab = int(net.config.vocab_size)

    ev = workload.evaluation

    def blocks(rows: int, length: int) -> torch.Tensor:
        return torch.randint(0, vocab, (rows, length), generator=gen)

    rates["forward"], rows, n, s = _timed(
        lambda r, n: next_token_loss(net, blocks(r, n), batch_size=ev.batch_size),
        lambda r, n: r * n * cost.forward_flops(arch, arch.layers, n), 4 * ev.batch_size, ev.seq_len)
    how["forward"] = f"next_token_loss, {rows} x {n} tokens in {s:.2f} s"

    if ev.tasks:
        rates["score"], how["score"] = _score_rate(net, arch, ev, blocks, dev)

    rates["table"], how["table"] = _table_rate(net, model, workload, dev, scored, rates["forward"], how["forward"],
                                               trust_remote_code)
    if workload.heals:
        rates["train"], how["train"] = _train_rate(net, tok, model, workload, dev, dtype, scored, rates["forward"],
                                                   trust_remote_code)
    result = Probe(model, name, precision, rates, how, time.strftime("%Y-%m-%dT%H:%M:%S"))
    return _store(result) if use_cache else result


def _store(result: Probe) -> Probe:
    """Write a probe's rates to its cache file (atomically); the result with its path."""
    from ray_prune.core.atomic import write_text

    path = cache_path(result.model, result.device, result.precision)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in asdict(result).items() if k not in ("cached", "path")}
    write_text(path, json.dumps(data, indent=1))
    return replace(result, path=str(path))


def _score_rate(net, arch, ev, blocks, dev) -> tuple[float, str]:
    """Continuation scoring as the harness runs it: contexts of the asked tasks' mean question length (at their
    limits), 4 one-token answers each; FLOPs counted with the LM head on the scored positions only."""
    import torch

    from ray_prune.core import cost
    from ray_prune.core.evaluation.loglikelihood import score_continuations

    limits = ev.limits()
    shapes = [cost.task_tokens(task, shots)[0] for task, shots in ev.shots().items()]
    counts = [min(tt.questions, limits[task] or tt.questions) for tt, task in zip(shapes, ev.shots())]
    L = max(2, round(sum(tt.length * q for tt, q in zip(shapes, counts)) / sum(counts)))  # the questions' mean
    answers = [[int(i)] for i in torch.randint(0, int(net.config.vocab_size), (4,),
                                               generator=torch.Generator().manual_seed(1))]

    def score(rows: int, n: int) -> None:
        requests = [(("", ""), ctx, a) for ctx in blocks(rows, n).tolist() for a in answers]
        score_continuations(net, requests, max(n + 2, arch.max_length), ev.batch_size, dev, logprobs=ev.logprobs)

    rate, rows, n, s = _timed(
        score, lambda r, n: r * (n * cost.forward_flops(arch, arch.layers, n, head=False) + cost.head_flops(arch)),
        4 * ev.batch_size, L)
    return rate, f"{rows} questions of {n} tokens, 4 one-token answers, in {s:.2f} s"


def _imports(quantize: str) -> None:
    """What a first load imports, imported before the load is timed: a sweep's worker pays it once, not per trial."""
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    if quantize == "nf4":
        import bitsandbytes  # noqa: F401


def _table_rate(net, model: str, workload: Workload, dev, scored: str, forward_rate: float, forward_how: str,
                trust_remote_code: bool) -> tuple[float, str]:
    """The distance table's forward (the decoder without its head, ``core.architecture.decoder``) in the experiment's
    inference dtype at the calibration shape: on the scoring model where that is the same full-precision model, else
    on the model loaded again in full precision, where its weights fit the device (else the forward rate, said so)."""
    import torch

    from ray_prune.core import cost, dtypes
    from ray_prune.core.architecture import decoder
    from ray_prune.core.memory.arch import Arch, param_count
    from ray_prune.core.models import load_model

    dtype = dtypes.to_torch(workload.dtype, dev, "inference")
    if scored != "none" or next(net.parameters()).dtype != dtype:
        need = param_count(Arch.from_config(net.config)).total() * torch.finfo(dtype).bits // 8
        if dev.type == "cuda" and need > 0.8 * torch.cuda.mem_get_info(dev)[0]:
            return forward_rate, f"as forward (the full-precision model does not fit the device): {forward_how}"
        net, _ = load_model(model, dtype=dtypes.short_name(dtype), device=dev, trust_remote_code=trust_remote_code)
    arch = Arch.from_config(net.config)
    body, cal = decoder(net), workload.calibration
    vocab = int(net.config.vocab_size)
    gen = torch.Generator().manual_seed(2)

    @torch.no_grad()
    def run(rows: int, n: int) -> None:
        body(input_ids=torch.randint(0, vocab, (rows, n), generator=gen).to(dev), use_cache=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    rate, rows, n, s = _timed(run, lambda r, n: r * n * cost.forward_flops(arch, arch.layers, n, head=False),
                              4 * cal.batch_size, cal.max_length)
    return rate, f"decoder without its head in {dtypes.short_name(dtype)}, {rows} x {n} tokens in {s:.2f} s"


def _train_rate(net, tok, model: str, workload: Workload, dev, dtype: str, scored: str, forward_rate: float,
                trust_remote_code: bool) -> tuple[float, str]:
    """Heal steps through ``heal.loop.heal`` at the heal micro-batch (fewer rows where a step would take more than a
    few seconds): the fastest step after the first, timed between two reports, less its validation loss (one block,
    priced at the measured forward rate)."""
    import torch

    from ray_prune.core import cost
    from ray_prune.core.heal.loop import heal
    from ray_prune.core.heal.lora import prepare_for_healing
    from ray_prune.core.memory.arch import Arch
    from ray_prune.core.models import load_model

    point = max(workload.heal, key=lambda h: h.batch_size * h.seq_len)
    if point.quantize != scored:  # the trial loads the model again in the heal precision
        net, tok = load_model(model, dtype=dtype, device=dev, quantize=point.quantize, purpose="training",
                              trust_remote_code=trust_remote_code)
    arch = Arch.from_config(net.config)
    # a step of a few seconds at most, by the forward rate: fewer rows than the micro-batch, then shorter ones
    per_token = cost.train_flops(arch, arch.layers, point) / forward_rate
    T = min(point.seq_len, max(MIN_TOKENS, int(SLICE_S / 2 / per_token)))
    rows = max(1, min(point.batch_size, int(SLICE_S / 2 / (per_token * T))))
    config = replace(point, steps=HEAL_STEPS, batch_size=rows, grad_accum=1, seq_len=T, eval_every=1,
                     val_sequences=1, warmup_steps=1)
    per_row = T * cost.train_flops(arch, arch.layers, config)
    gen = torch.Generator().manual_seed(1)
    vocab = int(net.config.vocab_size)
    train = torch.randint(0, vocab, (HEAL_STEPS * rows, T), generator=gen)
    val = torch.randint(0, vocab, (1, T), generator=gen)
    _, reports = heal(prepare_for_healing(net, config, device=dev), tok, config, train_blocks=train, val_blocks=val,
                      progress=False)
    val_s = T * cost.forward_flops(arch, arch.layers, T) / forward_rate
    seconds = max(min(b.elapsed_s - a.elapsed_s for a, b in zip(reports, reports[1:])) - val_s, 1e-9)
    return rows * per_row / seconds, f"the fastest of {len(reports) - 1} heal steps of {rows} x {T} tokens, " \
        f"{seconds:.2f} s"
