"""Stage 1: one profiling actor per model, which writes its distance table and its unpruned baseline row.

Each actor (one GPU where there are GPUs) loads the model once, computes the
distance table on the calibration set, the unpruned model's heal validation
loss for every heal shape in the grid (ASHA's reference), and the baseline
evaluation; it writes the table and the row to storage and exits, freeing its
GPU for the trials. The driver then reads back what the trials need.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from ray_prune.errors import UserError
from ray_prune.ledger.layout import table_path
from ray_prune.ledger.rows import write_row
from ray_prune.ledger.storage import Storage
from ray_prune.sweep.experiment import Experiment, ModelSpec
from ray_prune.sweep.grid import baseline_id
from ray_prune.sweep.plan import Plan
from ray_prune.sweep.rows import baseline_cell, cell_row


@dataclass
class Profiled:
    """What stage 1 hands stage 2 for one model."""

    heal_reference: dict[str, float]  # "<seq_len>x<val_sequences>" -> unpruned heal validation loss
    baseline_loss: float | None  # the unpruned model's C4 loss (None if not evaluated in this run)
    profile_s: float


def heal_shape(seq_len: int, val_sequences: int) -> str:
    return f"{seq_len}x{val_sequences}"


def _save_table(storage: Storage, model: str, table) -> None:
    local = storage.local_path(table_path(model))
    if local is not None:
        table.save(local)
        return
    with tempfile.TemporaryDirectory() as d:
        storage.write_bytes(table_path(model), table.save(os.path.join(d, "t.parquet")).read_bytes())


def profile_model(exp_dict: dict, spec_dict: dict, storage_uri: str, data_dir: str | None, need_table: bool,
                  need_baseline: bool, heal_shapes: list[tuple[int, int]], threads: int) -> Profiled:
    """Distance table + unpruned baseline of one model (runs inside the profiling actor)."""
    import torch

    from ray_prune.core.architecture import family_of, num_layers
    from ray_prune.core.data import load_texts, texts_for_tokens
    from ray_prune.core.loss import next_token_loss
    from ray_prune.core.models import load_model
    from ray_prune.core.packing import pack_texts
    from ray_prune.core.profile import profile
    from ray_prune.sweep.trial import device_seconds, run_evaluation

    torch.set_num_threads(max(1, threads))
    exp, spec, storage = Experiment(**exp_dict), ModelSpec(**spec_dict), Storage(storage_uri)
    model, tok = load_model(spec.name, dtype=exp.dtype, trust_remote_code=spec.trust_remote_code)
    family, _ = family_of(model)
    cal = exp.calibration
    t0 = time.perf_counter()
    if need_table:
        texts = load_texts("calibration", cal.samples, dataset=cal.dataset, data_dir_path=data_dir)
        _save_table(storage, spec.name, profile(model, tok, texts, metric=cal.metric, batch_size=cal.batch_size,
                                                max_length=cal.max_length, model_id=spec.name, progress=False))
    profile_s = time.perf_counter() - t0
    reference = {}
    for seq_len, val_sequences in heal_shapes:  # the blocks each heal setting validates on, as heal() packs them
        val = texts_for_tokens("validation", seq_len * val_sequences, tok, data_dir_path=data_dir)
        blocks = pack_texts(val, tok, seq_len, max_blocks=val_sequences)
        reference[heal_shape(seq_len, val_sequences)] = next_token_loss(model, blocks)
    baseline_loss = None
    if need_baseline:
        t = time.perf_counter()
        flat = run_evaluation(model, tok, exp.eval.model_dump(), data_dir)
        baseline_loss = flat.get("c4_loss")
        cell = baseline_cell(exp.name, spec.name, spec.trust_remote_code, num_layers(model), cal.model_dump(),
                             exp.eval.model_dump(), exp.dtype, baseline_id(exp, spec.name))
        wall = time.perf_counter() - t
        write_row(storage, cell_row(cell, "baseline", "finished", family=family, **flat, loss_ratio=1.0, wall_s=wall,
                                    profile_s=profile_s, gpu_s=device_seconds(wall),
                                    device=str(next(model.parameters()).device)))
    return Profiled(reference, baseline_loss, profile_s)


def run_profile_stage(p: Plan, gpus: float, cpus: int, rerun: bool) -> dict[str, Profiled]:
    """Profile every model that still has work, one actor each, in parallel; fill in earlier baselines' losses."""
    import ray

    exp, store = p.experiment, p.storage
    profiler = ray.remote(profile_model)
    futures = {}
    for m in p.models_with_work():
        shapes = sorted({(h["seq_len"], h["val_sequences"]) for h in exp.heal_points(m)})
        need_table = rerun or not store.exists(table_path(m.name))
        need_base = rerun or p.ledger.get((baseline_id(exp, m.name), "baseline")) != "finished"
        futures[m.name] = profiler.options(num_gpus=gpus, num_cpus=cpus, max_retries=1).remote(
            exp.model_dump(), m.model_dump(), store.uri, p.data_dir, need_table, need_base, shapes, cpus)
    out: dict[str, Profiled] = {}
    for name, fut in futures.items():
        try:
            out[name] = ray.get(fut)
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), UserError):
                raise e.cause from None
            raise
    if any(r.baseline_loss is None for r in out.values()):
        _earlier_baselines(p, out)
    return out


def _earlier_baselines(p: Plan, out: dict[str, Profiled]) -> None:
    """Baselines evaluated in an earlier run: read their C4 loss back from the rows."""
    from ray_prune.ledger.rows import load_results

    earlier = load_results(p.storage.uri)
    for name, r in out.items():
        hit = earlier[(earlier["stage"] == "baseline") & (earlier["cell_id"] == baseline_id(p.experiment, name))]
        if r.baseline_loss is None and len(hit) and hit["c4_loss"].notna().any():
            r.baseline_loss = float(hit["c4_loss"].iloc[0])


def load_tables(p: Plan) -> dict[str, Any]:
    """The distance table of every model that has pending similarity cells."""
    from ray_prune.core.distance import DistanceTable

    tables = {}
    for c in p.pending:
        if c.strategy == "similarity" and c.n > 0 and c.model not in tables:
            local = p.storage.local_path(table_path(c.model))
            if local is not None:
                tables[c.model] = DistanceTable.load(local)
                continue
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "t.parquet")
                with open(path, "wb") as f:
                    f.write(p.storage.read_bytes(table_path(c.model)))
                tables[c.model] = DistanceTable.load(path)
    return tables
