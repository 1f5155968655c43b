"""What each row of a cell holds: the one builder per kind of row (baseline, unhealed, healed, stopped, failed).

Columns and their types are the ledger's (``ledger/schema.py``); this module
fills them from a :class:`~ray_prune.sweep.grid.Cell` and what its trial measured.
"""

from __future__ import annotations

import traceback
from typing import Any

import ray_prune
from ray_prune.ledger.schema import calibration_values, heal_values
from ray_prune.sweep.grid import Cell


def cell_row(cell: Cell, stage: str, status: str, **extra: Any) -> dict[str, Any]:
    """The identity, model and heal-setting columns of a row of ``cell`` at ``stage``, plus ``extra``."""
    healed = stage == "healed"
    return {
        "experiment": cell.experiment, "cell_id": cell.unhealed_id if stage == "unhealed" else cell.cell_id,
        "unhealed_id": cell.unhealed_id, "stage": stage, "status": status, "model": cell.model,
        "trust_remote_code": bool(cell.trust_remote_code), "num_layers": cell.num_layers, "n": cell.n,
        "fraction": cell.fraction, "fraction_removed": cell.n / cell.num_layers, "strategy": cell.strategy,
        "removed_layers": list(cell.removed_layers), "seed": cell.seed if healed else None,
        "code_version": ray_prune.__version__, **(heal_values(cell.heal) if healed else {}),
        **(calibration_values(cell.calibration, cell.table_key) if cell.table_key else {}), **extra,
    }


def baseline_cell(exp_name: str, model: str, trust_remote_code: bool, num_layers: int, calibration: dict,
                  evaluation: dict, dtype: str, cell_id: str) -> Cell:
    """The unpruned model as a cell of its own (n = 0, strategy ``none``), for its baseline row."""
    return Cell(experiment=exp_name, model=model, trust_remote_code=trust_remote_code, num_layers=num_layers,
                fraction=0.0, n=0, strategy="none", seed=0, heal={}, calibration=calibration, eval=evaluation,
                dtype=dtype, cell_id=cell_id, unhealed_id="")


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
