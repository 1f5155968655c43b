"""What each row of a cell holds: the one builder per kind of row (baseline, unhealed, healed, stopped, failed).

Columns and their types are the ledger's (``ledger/schema.py``); this module
fills them from a :class:`~ray_prune.sweep.grid.Cell` and what its trial measured.
"""

from __future__ import annotations

import dataclasses
import traceback
from typing import Any

from ray_prune.core.provenance import eval_provenance
from ray_prune.ledger.schema import calibration_values, heal_values
from ray_prune.sweep.grid import Cell


def _provenance(cell: Cell, extra: dict[str, Any]) -> dict[str, Any]:
    """What the row's scores depend on beyond the cell's id (``core/provenance.py``), for the tasks the row scored
    (``<task>_n`` among its scores: an unhealed row scored for its loss alone, or a failed one, has no task's).
    The device is the one the caller names (``device=``); the quantization is the scored precision's label's
    ("nf4+fp32": nf4), as the caller passes it, since a baseline cell is built without ``scored_as``."""
    config = cell.eval_config()
    scored = {t: s for t, s in config.tasks.items() if extra.get(f"{t}_n") is not None}
    precision = extra.get("eval_precision")
    quantization = cell.scored_as if precision is None else (precision.split("+")[0] if "+" in precision else "none")
    return eval_provenance(dataclasses.replace(config, tasks=scored), precision, quantization, extra.get("device"))


def cell_row(cell: Cell, stage: str, status: str, **extra: Any) -> dict[str, Any]:
    """The identity, model, heal-setting and provenance columns of a row of ``cell`` at ``stage``, plus
    ``extra`` (which wins where both give a column)."""
    healed = stage == "healed"
    return {
        "experiment": cell.experiment, "cell_id": cell.unhealed_id if stage == "unhealed" else cell.cell_id,
        "unhealed_id": cell.unhealed_id, "stage": stage, "status": status, "model": cell.model,
        "trust_remote_code": bool(cell.trust_remote_code), "num_layers": cell.num_layers, "n": cell.n,
        "fraction": cell.fraction, "fraction_removed": cell.n / cell.num_layers, "strategy": cell.strategy,
        "removed_layers": list(cell.removed_layers), "repair": cell.repair, "seed": cell.seed if healed else None,
        **_provenance(cell, extra), **({"code_version": cell.code_version} if cell.code_version else {}),
        **(heal_values(cell.heal) if healed else {}),
        **(calibration_values(cell.calibration, cell.table_key) if cell.table_key or cell.repair != "none"
           else {}), **extra,
    }


def baseline_cell(exp_name: str, model: str, trust_remote_code: bool, num_layers: int, calibration: dict,
                  evaluation: dict, dtype: str, cell_id: str, scored_as: str = "none", code_version: str = "") -> Cell:
    """The unpruned model as a cell of its own (n = 0, strategy ``none``), for its baseline row."""
    return Cell(experiment=exp_name, model=model, trust_remote_code=trust_remote_code, num_layers=num_layers,
                fraction=0.0, n=0, strategy="none", seed=0, heal={}, calibration=calibration, eval=evaluation,
                dtype=dtype, cell_id=cell_id, unhealed_id="", scored_as=scored_as, code_version=code_version)


def curve_columns(points: list[tuple[int, float, float]]) -> dict[str, list]:
    """The heal curve (one point per evaluation: step, validation loss, training loss) as list columns."""
    return {"curve_step": [int(p[0]) for p in points], "curve_val_loss": [float(p[1]) for p in points],
            "curve_train_loss": [float(p[2]) for p in points]}


def failure_row(cell: Cell, status: str, error: BaseException | str | None, last: dict[str, Any]) -> dict[str, Any]:
    """The healed row the driver writes for a cell that failed for good, or that ASHA stopped."""
    msg = error if isinstance(error, str) or error is None else "".join(
        traceback.format_exception_only(type(error), error)).strip()
    return cell_row(cell, "healed", status, error=(msg or None) and str(msg)[-2000:],
                    heal_val_loss=last.get("heal_val_loss"), loss_ratio=last.get("loss_ratio"),
                    steps_done=last.get("heal_step"), tokens_seen=last.get("tokens_seen"))
