"""What one sweep cell does, start to finish: prune, evaluate, heal, evaluate again.

This is a recipe over the pure core, the only place that talks to Ray Tune
(``tune.report``/``tune.get_checkpoint``). Rows go straight to storage as each
stage finishes, so a killed trial loses only the stage it was in.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from ray_prune.faults import maybe_kill, maybe_raise
from ray_prune.grid import Cell
from ray_prune.results import flatten_metrics, write_row
from ray_prune.storage import Storage

CODE_VERSION = "0.1.0"


def cell_row(cell: Cell, stage: str, status: str, **extra: Any) -> dict[str, Any]:
    """The common columns of every row of a cell (schema in ray_prune.results)."""
    heal = cell.heal if stage == "healed" else {}
    return {
        "experiment": cell.experiment, "cell_id": cell.cell_id if stage != "unhealed" else cell.unhealed_id,
        "unhealed_id": cell.unhealed_id, "stage": stage, "status": status, "error": None,
        "model": cell.model, "trust_remote_code": bool(cell.trust_remote_code), "family": extra.pop("family", None), "num_layers": cell.num_layers, "n": cell.n,
        "fraction": cell.fraction, "fraction_removed": cell.n / cell.num_layers, "strategy": cell.strategy,
        "removed_layers": list(cell.removed_layers),
        "heal_lr": heal.get("lr"), "heal_rank": heal.get("rank"), "heal_steps": heal.get("steps"),
        "heal_batch_size": heal.get("batch_size"), "heal_seq_len": heal.get("seq_len"),
        "heal_quantize": heal.get("quantize"), "seed": cell.seed if stage == "healed" else None,
        "code_version": CODE_VERSION, **extra,
    }


def run_evaluation(model, tokenizer, spec: dict[str, Any], data_dir: str | None) -> dict[str, float]:
    """Tasks grouped by their limit (lm-eval runs once per group), plus the C4 loss."""
    from ray_prune.evaluate import evaluate, resolve_tasks

    defaults = resolve_tasks(list(spec["tasks"])) if spec["tasks"] else {}
    groups: dict[Any, dict[str, int]] = {}
    for name, t in spec["tasks"].items():
        shots = t.get("shots")
        groups.setdefault(t.get("limit"), {})[name] = defaults[name] if shots is None else shots
    scores: dict[str, float] = {}
    for limit, tasks in groups.items():
        scores.update(evaluate(model, tokenizer, tasks=tasks, limit=limit, data_dir=data_dir, c4_sequences=0,
                               batch_size=spec["batch_size"], progress=False))
    if spec["c4_sequences"]:
        scores.update(evaluate(model, tokenizer, tasks=[], data_dir=data_dir, c4_sequences=spec["c4_sequences"],
                               seq_len=spec["seq_len"], batch_size=spec["batch_size"], progress=False))
    return scores


def _device_seconds(seconds: float) -> float:
    return seconds * (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def run_cell(
    cell: Cell,
    storage: Storage,
    baseline_loss: float | None,
    data_dir: str | None,
    do_unhealed: bool,
    report: Callable[[dict[str, Any], str | None], None] | None = None,
    resume_from: str | None = None,
    reference_loss: float | None = None,
) -> dict[str, Any]:
    """Run one cell; ``report(metrics, checkpoint_dir)`` streams heal progress (Tune's report in a sweep).

    ``loss_ratio`` in rows is the C4 loss over the unpruned model's (``baseline_loss``); in heal
    reports it is the heal validation loss over the unpruned model's on the same blocks
    (``reference_loss``), which makes cells of different models comparable for ASHA.
    """
    from ray_prune.architecture import family_of
    from ray_prune.heal import HealConfig, heal, merge_adapter, prepare_for_healing
    from ray_prune.models import load_model
    from ray_prune.prune import prune_layers

    t0 = time.perf_counter()
    model, tok = load_model(cell.model, dtype=cell.dtype, trust_remote_code=cell.trust_remote_code)
    family, _ = family_of(model)
    prune_layers(model, cell.removed_layers)
    load_s = time.perf_counter() - t0
    device = str(next(model.parameters()).device)
    last: dict[str, Any] = {}

    def ratio(loss: float | None) -> float | None:
        return loss / baseline_loss if loss is not None and baseline_loss else None

    if do_unhealed:
        maybe_raise(cell.model, "unhealed")
        t = time.perf_counter()
        scores = flatten_metrics(run_evaluation(model, tok, cell.eval, data_dir))
        wall = time.perf_counter() - t
        write_row(storage, cell_row(cell, "unhealed", "finished", family=family, **scores,
                                    loss_ratio=ratio(scores.get("c4_loss")), wall_s=wall, eval_s=wall,
                                    gpu_s=_device_seconds(wall), device=device))
    if not cell.heal.get("enabled", True):
        return last

    work = Path(tempfile.mkdtemp(prefix="ray-prune-cell-"))
    try:
        model.save_pretrained(work / "pruned")
        tok.save_pretrained(work / "pruned")
        del model
        h = cell.heal
        config = HealConfig(steps=h["steps"], batch_size=h["batch_size"], grad_accum=h["grad_accum"],
                            seq_len=h["seq_len"], lr=h["lr"], rank=h["rank"], warmup_steps=min(h["warmup_steps"],
                            h["steps"]), target=h["target"], quantize=h["quantize"], eval_every=h["eval_every"],
                            val_sequences=h["val_sequences"], seed=cell.seed, dtype=cell.dtype)
        peft_model = prepare_for_healing(str(work / "pruned"), config)
        def on_eval(r) -> None:
            maybe_raise(cell.model, "heal")
            last.update(heal_step=r.step, heal_val_loss=r.val_loss, heal_train_loss=r.train_loss,
                        tokens_seen=r.tokens_seen,
                        loss_ratio=r.val_loss / reference_loss if reference_loss else r.val_loss)
            if report is not None:
                report(dict(last), r.checkpoint)
            maybe_kill("heal", cell.model)

        resumed_from_step = _checkpoint_step(resume_from)
        t = time.perf_counter()
        peft_model, reports = heal(peft_model, tok, config, callback=on_eval, checkpoint_dir=work / "checkpoint",
                                   resume_from=resume_from, data_dir=data_dir, progress=False)
        heal_s = time.perf_counter() - t
        maybe_raise(cell.model, "healed")
        t = time.perf_counter()
        # Evaluate the adapter folded into full-precision weights, the model one would deploy: NF4 is a
        # training-memory device, and its rounding error (~0.13 nats of C4 loss on SmolLM2) is not pruning damage.
        healed_model = merge_adapter(peft_model, inplace=True)
        del peft_model
        scores = flatten_metrics(run_evaluation(healed_model, tok, cell.eval, data_dir))
        eval_s = time.perf_counter() - t
        wall = time.perf_counter() - t0
        last.update(completed=True)
        write_row(storage, cell_row(cell, "healed", "finished", family=family, **scores,
                                    heal_val_loss=reports[-1].val_loss if reports else None,
                                    loss_ratio=ratio(scores.get("c4_loss")),
                                    steps_done=reports[-1].step if reports else 0,
                                    resumed_from_step=resumed_from_step,
                                    tokens_seen=reports[-1].tokens_seen if reports else 0,
                                    heal_s=heal_s, eval_s=eval_s, load_s=load_s, wall_s=wall, gpu_s=_device_seconds(wall), device=device,
                                    **curve_columns([(r.step, r.val_loss, r.train_loss) for r in reports])))
        if report is not None:
            report(dict(last), None)
        return last
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _checkpoint_step(resume_from: str | None) -> int:
    """The heal step a retried trial resumes from (0 for a fresh start): provenance for its row."""
    import json

    from ray_prune.heal import STATE_JSON, find_checkpoint

    checkpoint = find_checkpoint(resume_from) if resume_from else None
    return int(json.loads((checkpoint / STATE_JSON).read_text())["step"]) if checkpoint is not None else 0


def curve_columns(points: list[tuple[int, float, float]]) -> dict[str, list]:
    """The heal curve (one point per evaluation) as list columns of the healed row."""
    return {"curve_step": [int(p[0]) for p in points], "curve_val_loss": [float(p[1]) for p in points],
            "curve_train_loss": [float(p[2]) for p in points]}


def failure_row(cell: Cell, status: str, error: BaseException | str | None, last: dict[str, Any]) -> dict[str, Any]:
    """The row the driver writes for a cell that failed for good, or that ASHA stopped."""
    msg = error if isinstance(error, str) or error is None else "".join(
        traceback.format_exception_only(type(error), error)).strip()
    row = cell_row(cell, "healed", status, error=None)
    row.update(error=(msg or None) and str(msg)[-2000:], heal_val_loss=last.get("heal_val_loss"),
               loss_ratio=last.get("loss_ratio"), steps_done=last.get("heal_step"),
               tokens_seen=last.get("tokens_seen"))
    return row
