"""Stage 1: one actor per model, which prepares everything its trials share, then exits, freeing its GPU.

Each actor (one GPU where there are GPUs) packs the token blocks its trials read (``shared_blocks``),
computes the distance table on the calibration set in the experiment's inference precision, and, for
each precision the model's cells are scored in (``scoring``), the unpruned model's selection loss for
every heal shape in the grid (ASHA's reference) and its baseline row. The driver then reads back what
the trials need.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from ray_prune.errors import UserError
from ray_prune.ledger.layout import order_path, table_path
from ray_prune.ledger.questions import write_questions
from ray_prune.ledger.rows import write_row
from ray_prune.ledger.tables import (read_distance_table, read_greedy_order, write_distance_table,
                                     write_greedy_order)
from ray_prune.ledger.storage import Storage
from ray_prune.sweep.experiment import Experiment, ModelSpec
from ray_prune.sweep.grid import baseline_id, stage1_need
from ray_prune.sweep.interrupt import Interrupts
from ray_prune.sweep.plan import Plan, need_key
from ray_prune.sweep import shared_blocks
from ray_prune.sweep.rows import baseline_cell, cell_row
from ray_prune.sweep.shared_blocks import Need

log = logging.getLogger(__name__)


@dataclass
class Profiled:
    """What stage 1 hands stage 2 for one model."""

    blocks: dict[Need, str]  # the shared token blocks, by what they are for
    heal_reference: dict[str, float]  # reference_key(quantize, seq_len, val_sequences) -> unpruned selection loss
    baseline_loss: dict[str, float | None]  # quantize -> the unpruned model's C4 loss (None: not evaluated now)
    profile_s: float
    notes: list[str]  # stored files found invalid and made again, one line each


def reference_key(quantize: str, seq_len: int, val_sequences: int) -> str:
    return f"{quantize}:{seq_len}x{val_sequences}"


def _profile(exp: Experiment, spec: ModelSpec, storage: Storage, data_dir: str | None, work: list[tuple],
             streamed: bool, gpus: float) -> float:
    """What the model's cells need of stage 1 (``work``: (kind, key, calibration settings, rounds)): distance tables,
    in the experiment's inference precision, and greedy removal orders, the model loaded once; returns their
    seconds. ``streamed``: tables one block at a time from the safetensors shards (a model larger than the GPU,
    exact all the same; a greedy order needs the model in memory, which the plan checks)."""
    from ray_prune.core.calibration import CalibrationConfig
    from ray_prune.core.data import load_texts
    from ray_prune.core.models import load_model, load_tokenizer
    from ray_prune.core.profile import profile
    from ray_prune.core.profile_streamed import profile_streamed

    model = tok = None
    seconds = 0.0
    for kind, key, calibration, rounds in work:
        cal = CalibrationConfig.from_dict(calibration)
        texts = load_texts("calibration", cal.samples, dataset=cal.dataset, data_dir_path=data_dir,
                           source=exp.text_source(cal.dataset))
        if model is None and not (streamed and kind == "table"):
            model, tok = load_model(spec.name, dtype=exp.dtype, trust_remote_code=spec.trust_remote_code,
                                    spread=gpus > 1)
        tok = tok or load_tokenizer(spec.name, spec.trust_remote_code)
        t0 = time.perf_counter()
        if kind == "order":
            _greedy(storage, spec.name, key, model, tok, texts, cal, rounds)
        else:
            kw = dict(metric=cal.metric, batch_size=cal.batch_size, max_length=cal.max_length, model_id=spec.name,
                      progress=False)
            table = (profile_streamed(spec.name, tok, texts, dtype=exp.dtype, trust_remote_code=spec.trust_remote_code,
                                      **kw) if streamed else profile(model, tok, texts, **kw))
            table.extra = {**table.extra, "calibration": calibration}  # the report labels tables by it
            write_distance_table(storage, spec.name, key, table)
        seconds += time.perf_counter() - t0
    return seconds


def _greedy(storage: Storage, name: str, key: str, model, tok, texts: list[str], cal, rounds: int) -> None:
    """SLEB's greedy removal order on the calibration text, as many rounds as the model's largest greedy cell."""
    from ray_prune.core.greedy import greedy_order
    from ray_prune.core.packing import pack_texts, scored_bos

    blocks = pack_texts(texts, tok, cal.max_length, max_blocks=cal.greedy_blocks)
    log.info("%s: greedy removal order, %d rounds on %d blocks of %d tokens", name, rounds, len(blocks),
             cal.max_length)
    order = greedy_order(model, blocks, bos=scored_bos(tok), batch_size=cal.batch_size,
                         max_remove=rounds, model_id=name)
    write_greedy_order(storage, name, key, order)


def _score_unpruned(exp: Experiment, spec: ModelSpec, storage: Storage, data_dir: str | None, quantize: str,
                    blocks: dict, need_baseline: bool, profile_s: float, code_version: str = "",
                    eval_overrides: dict | None = None) -> tuple[dict[str, float], float | None]:
    """The unpruned model in one scoring precision: its selection losses (ASHA's reference) and baseline row."""
    from ray_prune.core.architecture import family_of, num_layers
    from ray_prune.core.loss import next_token_loss
    from ray_prune.core.models import default_device, load_model
    from ray_prune.core.packing import scored_bos
    from ray_prune.sweep.scoring import scoring
    from ray_prune.sweep.trial import device_seconds, run_evaluation

    heals = any(h.get("enabled", True) for h in exp.heal_points(spec))
    how = scoring(exp.dtype, quantize, exp.eval.precision, heals, default_device())
    model, tok = load_model(spec.name, dtype=how.dtype, quantize=how.quantize, trust_remote_code=spec.trust_remote_code)
    reference = {}
    for need, path in blocks.items():
        if need.role == "selection":
            for h in exp.heal_points(spec):
                if h["seq_len"] == need.seq_len:
                    val = shared_blocks.read(storage, path, h["val_sequences"])
                    reference[reference_key(quantize, need.seq_len, h["val_sequences"])] = next_token_loss(
                        model, val, bos=scored_bos(tok))
    if not need_baseline:
        return reference, None
    tasks = ", ".join(f"{k} ({v or 'all'} questions)" for k, v in exp.eval.config().limits().items())
    log.info("%s: baseline%s: %s%s", spec.name, f" in {how.label}", tasks or "no task",
             f", C4 loss on {exp.eval.c4_sequences} blocks" if exp.eval.c4_sequences else "")
    t = time.perf_counter()
    evaluation = {**exp.eval.model_dump(), **(eval_overrides or {})}  # the memory plan's batch, where it set one
    flat, records = run_evaluation(model, tok, evaluation, data_dir, _test_blocks(storage, blocks))
    cell = baseline_cell(exp.name, spec.name, spec.trust_remote_code, num_layers(model),
                         exp.calibrations()[0].model_dump(), evaluation, exp.dtype,
                         baseline_id(exp, spec.name, quantize), quantize, code_version)
    wall = time.perf_counter() - t
    write_questions(storage, exp.name, cell.cell_id, "baseline", spec.name, records)
    write_row(storage, cell_row(cell, "baseline", "finished", family=family_of(model)[0], **flat, loss_ratio=1.0,
                                eval_precision=how.label, wall_s=wall, profile_s=profile_s,
                                gpu_s=device_seconds(wall), device=str(next(model.parameters()).device)))
    return reference, flat.get("c4_loss")


def _test_blocks(storage: Storage, blocks: dict):
    path = next((p for n, p in blocks.items() if n.role == "test"), None)
    return None if path is None else shared_blocks.read(storage, path)


class _Forward(logging.Handler):
    """Progress lines of the core (its ``ray_prune.*`` loggers) from a stage-1 actor to the driver, which prints
    them: stage 1 is minutes of conversion, profiling and baselines, and would otherwise be silent."""

    def __init__(self, queue) -> None:
        super().__init__(logging.INFO)
        self.queue = queue

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record.getMessage())
        except Exception:  # noqa: BLE001 - a full or gone queue drops a progress line, never the work
            pass


def profile_model(exp_dict: dict, spec_dict: dict, storage_uri: str, data_dir: str | None,
                  work: list[tuple], baselines: list[str], threads: int, streamed: bool = False,
                  gpus: float = 0.0, queue=None, code_version: str = "", adjustments: dict | None = None) -> Profiled:
    """Stage 1 for one model (inside its actor): shared blocks, distance tables, references and baselines.

    ``work``: (kind, key, calibration settings, rounds) of each table or greedy order to compute and store (those
    not stored whole already). ``baselines``: the scoring quantizations whose baseline row is still missing.
    """
    import torch

    from ray_prune.core.models import load_tokenizer

    torch.set_num_threads(max(1, threads))
    if queue is not None:
        logger = logging.getLogger("ray_prune")
        logger.setLevel(logging.INFO)
        logger.addHandler(_Forward(queue))
    exp, spec, storage = Experiment(**exp_dict), ModelSpec(**spec_dict), Storage(storage_uri)
    adjustments = adjustments or {}
    if adjustments.get("calibration"):  # the memory plan's batch: what the table costs, not what it holds
        work = [(kind, key, {**cal, **adjustments["calibration"]}, rounds) for kind, key, cal, rounds in work]
    tok = load_tokenizer(spec.name, spec.trust_remote_code)
    wanted = shared_blocks.needs(exp.heal_points(spec), exp.eval.c4_sequences, exp.eval.seq_len)
    notes: list[str] = []
    blocks = shared_blocks.make(storage, tok, wanted, data_dir, exp.text_source("c4"), notes)
    profile_s = _profile(exp, spec, storage, data_dir, work, streamed, gpus) if work else 0.0
    references: dict[str, float] = {}
    losses: dict[str, float | None] = {}
    for quantize in exp.precisions(spec):
        ref, losses[quantize] = _score_unpruned(exp, spec, storage, data_dir, quantize, blocks,
                                                quantize in baselines, profile_s, code_version,
                                                adjustments.get("eval"))
        references.update(ref)
    return Profiled(blocks, references, losses, profile_s, notes)


def _stage1_to_make(p: Plan, model: str, rerun: bool, say) -> list[tuple]:
    """(kind, key, calibration settings, rounds) of each table and greedy order stage 1 must compute for ``model``:
    those its pending cells need that are not stored whole. A stored one that does not validate is reported,
    deleted and made again."""
    from ray_prune.ledger.tables import InvalidTable

    wanted: dict[tuple[str, str], list] = {}
    for c in p.pending:
        need = stage1_need(c) if c.model == model else None
        if need is not None:
            key = p.stage1_keys[(model, *need_key(need))]
            entry = wanted.setdefault((need[0], key), [need[1], 0])
            entry[1] = max(entry[1], c.n)
    out = []
    for (kind, key), (calibration, rounds) in wanted.items():
        path = table_path(model, key) if kind == "table" else order_path(model, key)
        if not rerun:
            try:
                if kind == "table":
                    read_distance_table(p.storage, model, key)
                else:
                    read_greedy_order(p.storage, model, key, rounds)
                continue
            except FileNotFoundError:
                pass
            except InvalidTable as e:
                say(f"{e}; computing it again for {model}")
                p.storage.delete(path)
        out.append((kind, key, calibration, rounds))
    return out


class Stage1:
    """Stage 1 of a sweep, under way: one profiling actor per model with work, each model's result collected as
    soon as its actor ends (``poll``), so that model's trials can start while the others still profile."""

    def __init__(self, p: Plan, gpus: dict[str, dict], cpus: int, rerun: bool, say=None) -> None:
        import ray

        self.p, self.t0 = p, time.monotonic()
        self.say = say or (lambda *a, **k: None)
        self.queue = None
        if say is not None:
            from ray.util.queue import Queue

            self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        exp, store = p.experiment, p.storage
        profiler = ray.remote(profile_model)
        self.futures: dict[str, Any] = {}
        for m in p.models_with_work():
            work = _stage1_to_make(p, m.name, rerun, self.say)
            baselines = [q for q in exp.precisions(m)
                         if rerun or p.ledger.get((baseline_id(exp, m.name, q), "baseline")) != "finished"]
            g = gpus[m.name]
            self.futures[m.name] = profiler.options(num_gpus=g["profile"], num_cpus=cpus, max_retries=1).remote(
                exp.model_dump(), m.model_dump(), store.uri, p.data_dir, work, baselines, cpus, g["streamed"],
                g["profile"], self.queue, p.code_version, p.adjustments(m.name))

    @property
    def pending(self) -> list[str]:
        return list(self.futures)

    def drain(self) -> None:
        """Print what the actors said since the last call."""
        while self.queue is not None and not self.queue.empty():
            try:
                line = self.queue.get_nowait()
            except Exception:  # noqa: BLE001 - emptied meanwhile
                return
            self.say(f"  [{_clock(time.monotonic() - self.t0)}] {line}")

    def poll(self, timeout: float = 0.0) -> list[tuple[str, Profiled]]:
        """The models whose stage 1 ended (waiting up to ``timeout`` for one), with what it hands their trials; a
        stage-1 failure raises (a UserError as itself)."""
        import ray

        self.drain()
        if not self.futures:
            return []
        names = {f: n for n, f in self.futures.items()}
        done, _ = ray.wait(list(names), num_returns=len(names), timeout=timeout)
        out = []
        for fut in done:
            name = names[fut]
            del self.futures[name]
            try:
                profiled = ray.get(fut)
            except ray.exceptions.RayTaskError as e:
                if isinstance(getattr(e, "cause", None), UserError):
                    raise e.cause from None
                raise
            for note in profiled.notes:
                self.say(note)
            if any(v is None for v in profiled.baseline_loss.values()):
                _earlier_baselines(self.p, {name: profiled})
            self.say(f"stage 1 done for {name} ({_clock(time.monotonic() - self.t0)})")
            out.append((name, profiled))
        self.drain()
        return out

    def cancel(self) -> None:
        """Stop the actors still profiling: on a shared cluster they would go on for nobody."""
        import ray

        for fut in self.futures.values():
            ray.cancel(fut, force=True)
        self.futures.clear()
        self.close()

    def close(self) -> None:
        if self.queue is not None:
            self.drain()
            self.queue.shutdown()
            self.queue = None


def run_profile_stage(p: Plan, gpus: dict[str, dict], cpus: int, rerun: bool,
                      interrupts: Interrupts | None = None, say=print) -> dict[str, Profiled]:
    """Profile every model that still has work and wait for all of them (a notebook's, or a benchmark's, way;
    the sweep starts each model's trials as its own stage 1 ends, ``cell_feed``). ``say`` prints progress (the
    actors' too); None is quiet."""
    stage = Stage1(p, gpus, cpus, rerun, say)
    out: dict[str, Profiled] = {}
    try:
        while stage.pending:
            with interrupts.during("waiting") if interrupts else contextlib.nullcontext():
                ready = stage.poll(timeout=0.5)
            if interrupts:
                interrupts.check()
            out.update(ready)
    except BaseException:
        stage.cancel()
        raise
    stage.close()
    return out


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


def _earlier_baselines(p: Plan, out: dict[str, Profiled]) -> None:
    """Baselines evaluated in an earlier run: read their C4 loss back from the rows."""
    from ray_prune.ledger.rows import load_results

    earlier = load_results(p.storage.uri)
    for name, r in out.items():
        for quantize, loss in r.baseline_loss.items():
            hit = earlier[(earlier["stage"] == "baseline")
                          & (earlier["cell_id"] == baseline_id(p.experiment, name, quantize))]
            if loss is None and len(hit) and hit["c4_loss"].notna().any():
                r.baseline_loss[quantize] = float(hit["c4_loss"].iloc[0])


def load_stage1(p: Plan, model: str) -> dict[tuple[str, str], Any]:
    """(kind, calibration id) -> the table or greedy order a model's pending cells choose layers by (stage 1 made
    or checked each)."""
    out: dict[tuple[str, str], Any] = {}
    for c in p.pending:
        need = stage1_need(c) if c.model == model else None
        if need is None or need_key(need) in out:
            continue
        key = p.stage1_keys[(model, *need_key(need))]
        out[need_key(need)] = (read_distance_table(p.storage, model, key) if need[0] == "table"
                               else read_greedy_order(p.storage, model, key, c.n))
    return out
