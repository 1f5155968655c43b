"""What one sweep cell does, as named steps over the pure core: prune, evaluate, heal, evaluate again.

Rows go to storage as each step finishes, so a killed trial loses only the step it was in. The trial never
imports Ray: it reports heal progress through the ``report`` callable it is given (Tune's ``tune.report``
in a sweep, ``tune_run.report_to_tune``), so the same recipe runs in a notebook.

A QLoRA cell loads its model straight into NF4 from the original checkpoint and prunes the quantized model
in memory: no full-precision copy is written to disk or loaded twice. Its rows are scored in the precision
it heals in (``scoring``): the unhealed row on that NF4 model, the healed row on it with the adapter
applied unmerged, the model that was trained. Text comes pre-packed from stage 1 (``shared_blocks``).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ray_prune.ledger.layout import adapter_path, stable_hash
from ray_prune.ledger.rows import write_row
from ray_prune.ledger.schema import flatten_metrics
from ray_prune.ledger.storage import Storage
from ray_prune.sweep import shared_blocks
from ray_prune.sweep.grid import Cell
from ray_prune.sweep.rows import cell_row, curve_columns
from ray_prune.sweep.scoring import Scoring, scoring

Report = Callable[[dict[str, Any], "str | None"], None]


@dataclass
class TrialSpec:
    """Everything a trial needs, as the driver hands it to Tune (one per grid point)."""

    cell: Cell
    storage_uri: str
    data_dir: str | None
    threads: int
    baseline_loss: float | None  # the unpruned model's C4 loss, same precision: rows' loss_ratio
    reference_loss: float | None  # the unpruned model's selection loss: what ASHA compares heal losses by
    do_unhealed: bool  # this trial owns its pruned model's unhealed row (or one of its twins does)
    blocks: dict[str, str] = field(default_factory=dict)  # role -> stored token blocks (shared_blocks)
    gpus: float = 0.0  # what Ray gives the trial (the memory plan's GPUs for this model); > 1: model spread on them
    twins: list[Cell] = field(default_factory=list)  # cells whose every input is this cell's: they get its rows
    calibration_source: Any = None  # where the cell's calibration text streams from (core.data.TextSource)

    def cells(self, stage: str) -> list[Cell]:
        """The cells that get a row of ``stage`` from this trial: the unhealed row goes to each cell that owns its
        pruned model's unhealed row, the healed row to every cell."""
        every = [self.cell, *self.twins]
        return [c for c in every if c.owns_unhealed] if stage == "unhealed" else every


def computation_key(cell: Cell) -> str:
    """What a cell computes, whatever it is called: its model, the layers it removes, how it heals and is scored.
    Cells with the same key (say, a similarity and a deepest cell that remove the same block) compute the same
    numbers, so one trial serves them all."""
    from ray_prune.sweep.grid import heal_identity

    repair = {"repair": cell.repair, "calibration": cell.calibration} if cell.repair != "none" else {}
    return stable_hash({"model": cell.model, "removed": list(cell.removed_layers), "heal": heal_identity(cell.heal),
                        "seed": cell.seed, "scored": cell.scored_as, "eval": cell.eval, "dtype": cell.dtype,
                        **repair})


def fold_identical(specs: list[TrialSpec]) -> list[TrialSpec]:
    """One trial per computation (``computation_key``): the first cell of each group runs, the others become its
    twins and get the same rows, each recording which cell's trial computed it (``computed_by``)."""
    groups: dict[str, TrialSpec] = {}
    for spec in specs:
        key = computation_key(spec.cell)
        if key not in groups:
            groups[key] = spec
            continue
        first = groups[key]
        first.twins.append(spec.cell)
        first.do_unhealed = first.do_unhealed or spec.do_unhealed
    return list(groups.values())


def write_stage_rows(storage: Storage, spec: TrialSpec, stage: str, status: str, records: list[dict] | None = None,
                     **fields: Any) -> None:
    """A stage's row for every cell this trial serves (``TrialSpec.cells``), each after its per-question outputs
    (``ledger.questions``), so a finished row always has them; the twins' say which cell computed them."""
    from ray_prune.ledger.questions import write_questions

    for cell in spec.cells(stage):
        computed_by = None if cell is spec.cell else spec.cell.cell_id
        row = cell_row(cell, stage, status, **fields, computed_by=computed_by)
        write_questions(storage, cell.experiment, row["cell_id"], stage, cell.model, records or [])
        write_row(storage, row)

def run_evaluation(model, tokenizer, evaluation: dict[str, Any], data_dir: str | None,
                   c4_blocks: torch.Tensor | None = None) -> tuple[dict[str, float], list[dict]]:
    """A cell's evaluation (its ``eval`` section): the core's ``evaluate``, flattened to row columns, and each
    question's record (``core.evaluation.paired``)."""
    from ray_prune.core.evaluation.config import EvalConfig
    from ray_prune.core.evaluation.harness import evaluate

    records: list[dict] = []
    scores = evaluate(model, tokenizer, EvalConfig.from_dict(evaluation), data_dir=data_dir, progress=False,
                      c4_blocks=c4_blocks, records=records)
    return flatten_metrics(scores), records


def device_seconds(seconds: float) -> float:
    return seconds * (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def _ratio(loss: float | None, reference: float | None) -> float | None:
    return loss / reference if loss is not None and reference else None


def load_pruned(cell: Cell, how: Scoring, gpus: float = 0.0, data_dir: str | None = None, source=None):
    """Step 1: the cell's model, loaded as it is scored (NF4 straight from the checkpoint for QLoRA cells),
    with its layers removed in memory, and repaired where the cell says (``repair_pruned``); (model, tokenizer,
    family)."""
    from ray_prune.core.architecture import family_of
    from ray_prune.core.models import load_model
    from ray_prune.core.prune import prune_layers

    if cell.repair != "none":
        return repair_pruned(cell, how, gpus, data_dir, source)
    model, tok = load_model(cell.model, dtype=how.dtype, quantize=how.quantize,
                            trust_remote_code=cell.trust_remote_code, spread=gpus > 1)
    family, _ = family_of(model)
    prune_layers(model, cell.removed_layers)
    return model, tok, family


def repair_pruned(cell: Cell, how: Scoring, gpus: float, data_dir: str | None, source=None):
    """A repaired cell's model: loaded in full precision (a fold changes weights, which NF4 cannot take), pruned
    and repaired on the cell's calibration text (``core.repair.linear_repair``), then, for a QLoRA cell, saved and
    loaded again in NF4, as it heals and is scored."""
    import tempfile

    from ray_prune.core.architecture import family_of
    from ray_prune.core.calibration import CalibrationConfig
    from ray_prune.core.data import load_texts
    from ray_prune.core.models import load_model
    from ray_prune.core.packing import pack_texts
    from ray_prune.core.repair import default_form, linear_repair

    model, tok = load_model(cell.model, dtype=how.dtype, quantize="none", trust_remote_code=cell.trust_remote_code,
                            spread=gpus > 1)
    family, _ = family_of(model)
    cal = CalibrationConfig.from_dict(cell.calibration)
    texts = load_texts("calibration", cal.samples, dataset=cal.dataset, data_dir_path=data_dir, source=source)
    blocks = pack_texts(texts, tok, cal.max_length, max_blocks=cal.samples)
    linear_repair(model, cell.removed_layers, blocks, batch_size=cal.batch_size, form=default_form(model.config))
    if how.quantize == "nf4":
        with tempfile.TemporaryDirectory(prefix="ray-prune-repaired-") as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            del model
            model, tok = load_model(tmp, dtype=how.dtype, quantize="nf4")
    return model, tok, family


def _blocks(spec: TrialSpec, storage: Storage, role: str, count: int | None = None):
    path = spec.blocks.get(role)
    return None if path is None else shared_blocks.read(storage, path, count)


def evaluate_unhealed(spec: TrialSpec, storage: Storage, model, tok, family: str, how: Scoring) -> None:
    """Step 2: the pruned model's scores before healing (one trial per pruned model runs this)."""
    cell = spec.cell
    ev = {**cell.eval, "tasks": {}} if cell.eval["unhealed"] == "loss" else cell.eval
    t = time.perf_counter()
    scores, records = run_evaluation(model, tok, ev, spec.data_dir, _blocks(spec, storage, "test"))
    wall = time.perf_counter() - t
    write_stage_rows(storage, spec, "unhealed", "finished", records, family=family, **scores,
                     eval_precision=how.label,
                     loss_ratio=_ratio(scores.get("c4_loss"), spec.baseline_loss), wall_s=wall, eval_s=wall,
                     gpu_s=device_seconds(wall), device=str(next(model.parameters()).device))


def heal_cell(spec: TrialSpec, storage: Storage, model, tok, work: Path, last: dict[str, Any],
              report: Report | None, resume_from: str | None):
    """Step 3: heal the pruned model in memory, reporting every evaluation; (peft model, reports, seconds)."""
    from ray_prune.core.heal.lora import prepare_for_healing
    from ray_prune.core.heal.loop import heal

    config = spec.cell.heal_config()
    peft_model = prepare_for_healing(model, config)

    def on_eval(r) -> None:
        last.update(heal_step=r.step, heal_val_loss=r.val_loss, heal_train_loss=r.train_loss,
                    tokens_seen=r.tokens_seen,
                    loss_ratio=r.val_loss / spec.reference_loss if spec.reference_loss else r.val_loss)
        if report is not None:
            report(dict(last), r.checkpoint)

    t = time.perf_counter()
    peft_model, reports = heal(
        peft_model, tok, config, callback=on_eval, checkpoint_dir=work / "checkpoint", resume_from=resume_from,
        data_dir=spec.data_dir, progress=False,
        train_blocks=_blocks(spec, storage, "heal", config.steps * config.sequences_per_step),
        val_blocks=_blocks(spec, storage, "selection", config.val_sequences))
    return peft_model, reports, time.perf_counter() - t


def save_adapter(spec: TrialSpec, storage: Storage, peft_model, how: Scoring, work: Path) -> str:
    """The trained adapter, under the storage root, with the record ``ray-prune eval --adapter`` rebuilds from."""
    from ray_prune.core.heal.checkpoint import save_adapter_files, write_adapter_record

    cell, rel = spec.cell, adapter_path(spec.cell.model, spec.cell.cell_id)
    local = work / "adapter"
    save_adapter_files(peft_model, local)
    write_adapter_record(local, cell.model, cell.removed_layers, cell.num_layers, how.quantize,
                         str(how.dtype).removeprefix("torch."), how.label,
                         trust_remote_code=cell.trust_remote_code, cell_id=cell.cell_id)
    for f in sorted(local.iterdir()):
        storage.write_bytes(f"{rel}/{f.name}", f.read_bytes())
    return rel


def evaluate_healed(spec: TrialSpec, storage: Storage, peft_model, tok, family: str, reports: list,
                    timing: dict[str, float], resumed_from_step: int, how: Scoring, adapter: str) -> None:
    """Step 4: the healed model's scores, with its heal curve and the cell's cost."""
    from ray_prune.core.heal.lora import merge_adapter

    t = time.perf_counter()
    model = merge_adapter(peft_model, inplace=True, dtype=how.dtype) if how.merged else peft_model
    device = str(next(model.parameters()).device)
    scores, records = run_evaluation(model, tok, spec.cell.eval, spec.data_dir, _blocks(spec, storage, "test"))
    eval_s = time.perf_counter() - t
    wall = time.perf_counter() - timing["t0"]
    final = reports[-1] if reports else None
    write_stage_rows(
        storage, spec, "healed", "finished", records, family=family, **scores, eval_precision=how.label,
        adapter=adapter,
        heal_val_loss=final.val_loss if final else None, loss_ratio=_ratio(scores.get("c4_loss"), spec.baseline_loss),
        steps_done=final.step if final else 0, resumed_from_step=resumed_from_step,
        tokens_seen=final.tokens_seen if final else 0, heal_s=timing["heal_s"], eval_s=eval_s,
        load_s=timing["load_s"], wall_s=wall, gpu_s=device_seconds(wall), device=device,
        **curve_columns([(r.step, r.val_loss, r.train_loss) for r in reports]))


def run_cell(spec: TrialSpec, report: Report | None = None, resume_from: str | None = None) -> dict[str, Any]:
    """Run one cell start to finish; ``report(metrics, checkpoint_dir)`` streams heal progress.

    ``loss_ratio`` in rows is the C4 loss over the unpruned model's (``baseline_loss``); in heal
    reports it is the heal validation loss over the unpruned model's on the same blocks
    (``reference_loss``), which makes cells of different models comparable for ASHA.
    """
    import shutil

    from ray_prune.core.heal.checkpoint import checkpoint_step
    from ray_prune.core.models import default_device

    cell, storage = spec.cell, Storage(spec.storage_uri)
    how = scoring(cell.dtype, cell.scored_as, cell.eval.get("precision", "trained"), cell.heals, default_device())
    t0 = time.perf_counter()
    model, tok, family = load_pruned(cell, how, spec.gpus, spec.data_dir, spec.calibration_source)
    timing = {"t0": t0, "load_s": time.perf_counter() - t0}
    last: dict[str, Any] = {}
    if spec.do_unhealed:
        evaluate_unhealed(spec, storage, model, tok, family, how)
    if not cell.heals:
        return last
    if how.quantize != cell.heal["quantize"]:  # scored in full precision, healed on NF4: the trained base apart
        from ray_prune.core import dtypes

        del model
        train_dtype = dtypes.to_torch(cell.dtype, default_device(), "training")
        model, tok, family = load_pruned(cell, Scoring(cell.heal["quantize"], train_dtype, how.label, how.merged),
                                         spec.gpus, spec.data_dir, spec.calibration_source)
    resumed_from_step = checkpoint_step(resume_from)
    work = Path(tempfile.mkdtemp(prefix="ray-prune-cell-"))
    try:
        peft_model, reports, timing["heal_s"] = heal_cell(spec, storage, model, tok, work, last, report, resume_from)
        del model
        adapter = save_adapter(spec, storage, peft_model, how, work)
        evaluate_healed(spec, storage, peft_model, tok, family, reports, timing, resumed_from_step, how, adapter)
        last.update(completed=True)
        if report is not None:
            report(dict(last), None)
        return last
    finally:
        shutil.rmtree(work, ignore_errors=True)
