"""What one sweep cell does, as named steps over the pure core: prune, evaluate, heal, evaluate again.

Rows go to storage as each step finishes, so a killed trial loses only the
step it was in. The trial never imports Ray: it reports heal progress through
the ``report`` callable it is given (Tune's ``tune.report`` in a sweep,
``tune_run.report_to_tune``), so the same recipe runs in a notebook.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ray_prune.ledger.rows import write_row
from ray_prune.ledger.schema import flatten_metrics
from ray_prune.ledger.storage import Storage
from ray_prune.sweep.grid import Cell
from ray_prune.sweep.rows import cell_row, curve_columns

Report = Callable[[dict[str, Any], "str | None"], None]


@dataclass
class TrialSpec:
    """Everything a trial needs, as the driver hands it to Tune (one per grid point)."""

    cell: Cell
    storage_uri: str
    data_dir: str | None
    threads: int
    baseline_loss: float | None  # the unpruned model's C4 loss: rows' loss_ratio
    reference_loss: float | None  # the unpruned model's heal validation loss: what ASHA compares cells by
    do_unhealed: bool  # this trial owns its pruned model's unhealed row


def run_evaluation(model, tokenizer, spec: dict[str, Any], data_dir: str | None) -> dict[str, float]:
    """The experiment's evaluation: tasks grouped by their limit (lm-eval runs once per group), then the C4 loss."""
    from ray_prune.core.evaluation.harness import evaluate
    from ray_prune.core.evaluation.tasks import resolve_tasks

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
    return flatten_metrics(scores)


def device_seconds(seconds: float) -> float:
    return seconds * (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _ratio(loss: float | None, reference: float | None) -> float | None:
    return loss / reference if loss is not None and reference else None


def load_pruned(cell: Cell):
    """Step 1: the cell's model with its layers removed; (model, tokenizer, family)."""
    from ray_prune.core.architecture import family_of
    from ray_prune.core.models import load_model
    from ray_prune.core.prune import prune_layers

    model, tok = load_model(cell.model, dtype=cell.dtype, trust_remote_code=cell.trust_remote_code)
    family, _ = family_of(model)
    prune_layers(model, cell.removed_layers)
    return model, tok, family


def evaluate_unhealed(spec: TrialSpec, storage: Storage, model, tok, family: str) -> None:
    """Step 2: the pruned model's scores before healing (one trial per pruned model runs this)."""
    cell = spec.cell
    t = time.perf_counter()
    scores = run_evaluation(model, tok, cell.eval, spec.data_dir)
    wall = time.perf_counter() - t
    write_row(storage, cell_row(cell, "unhealed", "finished", family=family, **scores,
                                loss_ratio=_ratio(scores.get("c4_loss"), spec.baseline_loss), wall_s=wall,
                                eval_s=wall, gpu_s=device_seconds(wall), device=str(next(model.parameters()).device)))


def heal_cell(spec: TrialSpec, pruned_dir: Path, tok, last: dict[str, Any], report: Report | None,
              resume_from: str | None):
    """Step 3: QLoRA-heal the saved pruned model, reporting every evaluation; (peft model, reports, seconds)."""
    from ray_prune.core.heal.lora import prepare_for_healing
    from ray_prune.core.heal.loop import heal

    work = pruned_dir.parent
    config = spec.cell.heal_config()
    peft_model = prepare_for_healing(str(pruned_dir), config)

    def on_eval(r) -> None:
        last.update(heal_step=r.step, heal_val_loss=r.val_loss, heal_train_loss=r.train_loss,
                    tokens_seen=r.tokens_seen,
                    loss_ratio=r.val_loss / spec.reference_loss if spec.reference_loss else r.val_loss)
        if report is not None:
            report(dict(last), r.checkpoint)

    t = time.perf_counter()
    peft_model, reports = heal(peft_model, tok, config, callback=on_eval, checkpoint_dir=work / "checkpoint",
                               resume_from=resume_from, data_dir=spec.data_dir, progress=False)
    return peft_model, reports, time.perf_counter() - t


def evaluate_healed(spec: TrialSpec, storage: Storage, peft_model, tok, family: str, reports: list,
                    timing: dict[str, float], resumed_from_step: int) -> None:
    """Step 4: the healed model's scores, with its heal curve and the cell's cost."""
    from ray_prune.core.heal.lora import merge_adapter

    t = time.perf_counter()
    # Evaluate the adapter folded into full-precision weights, the model one would deploy: NF4 is a
    # training-memory device, and its rounding error (~0.13 nats of C4 loss on SmolLM2) is not pruning damage.
    healed_model = merge_adapter(peft_model, inplace=True)
    device = str(next(healed_model.parameters()).device)
    scores = run_evaluation(healed_model, tok, spec.cell.eval, spec.data_dir)
    eval_s = time.perf_counter() - t
    wall = time.perf_counter() - timing["t0"]
    final = reports[-1] if reports else None
    write_row(storage, cell_row(
        spec.cell, "healed", "finished", family=family, **scores,
        heal_val_loss=final.val_loss if final else None, loss_ratio=_ratio(scores.get("c4_loss"), spec.baseline_loss),
        steps_done=final.step if final else 0, resumed_from_step=resumed_from_step,
        tokens_seen=final.tokens_seen if final else 0, heal_s=timing["heal_s"], eval_s=eval_s,
        load_s=timing["load_s"], wall_s=wall, gpu_s=device_seconds(wall), device=device,
        **curve_columns([(r.step, r.val_loss, r.train_loss) for r in reports])))


def run_cell(spec: TrialSpec, report: Report | None = None, resume_from: str | None = None) -> dict[str, Any]:
    """Run one cell start to finish; ``report(metrics, checkpoint_dir)`` streams heal progress.

    ``loss_ratio`` in rows is the C4 loss over the unpruned model's (``baseline_loss``); in heal
    reports it is the heal validation loss over the unpruned model's on the same blocks
    (``reference_loss``), which makes cells of different models comparable for ASHA.
    """
    from ray_prune.core.heal.checkpoint import checkpoint_step

    storage = Storage(spec.storage_uri)
    t0 = time.perf_counter()
    model, tok, family = load_pruned(spec.cell)
    timing = {"t0": t0, "load_s": time.perf_counter() - t0}
    last: dict[str, Any] = {}
    if spec.do_unhealed:
        evaluate_unhealed(spec, storage, model, tok, family)
    if not spec.cell.heals:
        return last
    resumed_from_step = checkpoint_step(resume_from)
    work = Path(tempfile.mkdtemp(prefix="ray-prune-cell-"))
    try:
        model.save_pretrained(work / "pruned")  # bitsandbytes quantizes at load time: NF4 loads from disk
        tok.save_pretrained(work / "pruned")
        del model
        peft_model, reports, timing["heal_s"] = heal_cell(spec, work / "pruned", tok, last, report, resume_from)
        evaluate_healed(spec, storage, peft_model, tok, family, reports, timing, resumed_from_step)
        last.update(completed=True)
        if report is not None:
            report(dict(last), None)
        return last
    finally:
        shutil.rmtree(work, ignore_errors=True)
