"""Expand an experiment into cells, each with an id that hashes everything that shapes its result.

The id is the ledger key: a rerun skips every cell whose id already has a
finished row, and adding a fraction or a model adds only new ids. The code
version is recorded in every row but deliberately left out of the id, so an
upgrade of ray-prune does not invalidate a week of GPU time; so is any setting
whose ``identity`` metadata says it does not change the result, and a setting
added later enters the id only once it is set away from its default
(``Settings.identity_of``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ray_prune.core.calibration import CalibrationConfig
from ray_prune.core.evaluation.config import EvalConfig
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.select import STAGE1_NEEDS, check_n, n_from_fraction
from ray_prune.errors import UserError
from ray_prune.ledger.layout import stable_hash
from ray_prune.sweep.experiment import Experiment, ModelSpec


@dataclass
class Cell:
    """One trial: a pruned model, healed with one setting, evaluated before and after."""

    experiment: str
    model: str
    trust_remote_code: bool
    num_layers: int
    fraction: float
    n: int
    strategy: str
    seed: int
    heal: dict[str, Any]  # the experiment's heal section at this grid point (HealConfig settings + enabled)
    calibration: dict[str, Any]
    eval: dict[str, Any]  # the experiment's eval section (EvalConfig settings + unhealed, precision)
    dtype: str
    cell_id: str = ""
    unhealed_id: str = ""
    owns_unhealed: bool = False  # one cell per pruned model evaluates it unhealed
    scored_as: str = "none"  # "nf4": every row of the cell is scored on an NF4 base, as it heals (see scored_as())
    removed_layers: list[int] = field(default_factory=list)  # filled in once the model is profiled
    table_key: str | None = None  # the stored distance table that chose removed_layers (ledger.tables), if one did
    code_version: str = ""  # the driver's commit (core.provenance): workers may run from a copy without .git
    repair: str = "none"  # the training-free repair applied right after pruning (core.repair)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def heals(self) -> bool:
        return bool(self.heal.get("enabled", True))

    def heal_config(self) -> HealConfig:
        """The HealConfig this cell trains with: its heal settings, its seed, the experiment's dtype."""
        return HealConfig.from_point(self.heal, seed=self.seed, dtype=self.dtype)

    def eval_config(self) -> EvalConfig:
        return EvalConfig.from_dict(self.eval)

    def calibration_config(self) -> CalibrationConfig:
        return CalibrationConfig.from_dict(self.calibration)


# Strategies whose choice of layers depends on calibration data (what they need of stage 1): the calibration
# setting is part of their cells' identity, and a list of settings multiplies them. A repair fits on calibration
# data too.
USES_CALIBRATION: tuple[str, ...] = tuple(STAGE1_NEEDS)


def calibration_id(calibration: dict[str, Any]) -> str:
    """A short name of one calibration setting (its identity's hash): what tables and cells are keyed by."""
    return stable_hash(CalibrationConfig.identity_of(calibration))


def stage1_need(cell: Cell) -> tuple[str, dict[str, Any]] | None:
    """What ``cell`` needs of its model's stage 1 (``core.select.STAGE1_NEEDS``): ``("table", calibration)`` or
    ``("order", calibration)``, the calibration with the metric the strategy reads; None for a strategy that needs
    nothing (deepest, or n = 0)."""
    if not cell.n or cell.strategy not in STAGE1_NEEDS:
        return None
    kind, metric = STAGE1_NEEDS[cell.strategy]
    if kind == "order":  # a greedy order reads the calibration loss, not a distance: one order whatever the metric
        metric = CalibrationConfig().metric
    return kind, ({**cell.calibration, "metric": metric} if metric else cell.calibration)


def heal_identity(point: dict[str, Any]) -> dict[str, Any]:
    """The part of a heal point that names a cell (see the module docstring and ``HealConfig``'s metadata)."""
    return HealConfig.identity_of({"enabled": True, **point})


def eval_identity(exp: Experiment) -> dict[str, Any]:
    """The part of the eval section that names a cell."""
    return EvalConfig.identity_of(exp.eval.model_dump())


def scored_as(exp: Experiment, heal: dict[str, Any]) -> str:
    """How the rows of a cell healed with ``heal`` are scored: with an NF4 base ("nf4") or in full precision."""
    if exp.eval.precision == "trained" and heal.get("enabled", True):
        return heal["quantize"]
    return "none"


def baseline_id(exp: Experiment, model: str, quantize: str = "none") -> str:
    """The id of a model's unpruned baseline row, one per precision its cells are scored in."""
    key = {"baseline": model, "eval": eval_identity(exp), "dtype": exp.dtype}
    if quantize != "none":
        key["quantize"] = quantize
    return stable_hash(key)


def _n_of(fraction: float, spec: ModelSpec, L: int) -> int:
    try:
        n = n_from_fraction(fraction, L)
    except UserError:
        raise UserError(f"fraction {fraction} of {spec.name}'s {L} layers rounds to n={round(fraction * L)}, "
                        f"which leaves no layer", "use fractions below 1 - 0.5/L") from None
    check_n(n, L)
    return n


def merged_fractions(exp: Experiment, num_layers: dict[str, int]) -> list[str]:
    """One line per fraction that rounds to the same n as a smaller fraction of the grid, so runs no cell of its
    own: what was asked and what runs differ there, and the user is told before anything loads."""
    lines = []
    for spec in exp.models:
        L = num_layers[spec.name]
        first: dict[int, float] = {}
        for fraction in exp.fraction_values(spec):
            n = _n_of(fraction, spec, L)
            if n in first:
                lines.append(f"{spec.name}: fraction {fraction:g} removes n={n} of {L} layers, as fraction "
                             f"{first[n]:g} does: one cell for both")
            else:
                first[n] = fraction
    return lines


def _add_cells(cells: dict[str, Cell], owners: set[str], exp: Experiment, spec: ModelSpec, L: int, fraction: float,
               n: int, strategy: str, repair: str, calibration: dict, prune_key: dict, evaluation: dict) -> None:
    """The cells of one pruned model (model, n, strategy, repair, calibration): one per heal point and seed. The
    first to claim the pruned model's unhealed row owns it."""
    for heal in exp.heal_points(spec, fraction):
        quantize = scored_as(exp, heal)
        unhealed_id = (baseline_id(exp, spec.name, quantize) if n == 0
                       else stable_hash({**prune_key, "scored": quantize}))
        for seed in exp.seeds:
            cell_id = stable_hash({**prune_key, "heal": heal_identity(heal), "seed": seed})
            if cell_id in cells:
                continue
            cells[cell_id] = Cell(
                experiment=exp.name, model=spec.name, trust_remote_code=spec.trust_remote_code, num_layers=L,
                fraction=fraction, n=n, strategy=strategy, seed=seed, heal=heal, calibration=calibration,
                eval=evaluation, dtype=exp.dtype, cell_id=cell_id, unhealed_id=unhealed_id,
                owns_unhealed=n > 0 and unhealed_id not in owners, scored_as=quantize, repair=repair)
            owners.add(unhealed_id)


def expand(exp: Experiment, num_layers: dict[str, int]) -> list[Cell]:
    """All cells of the grid, deduplicated (two fractions that round to the same n are one cell)."""
    cells: dict[str, Cell] = {}
    owners: set[str] = set()
    calibrations = [c.model_dump() for c in exp.calibrations()]
    evaluation = exp.eval.model_dump()
    evaluation_id = eval_identity(exp)
    for spec in exp.models:
        L = num_layers[spec.name]
        for fraction in exp.fraction_values(spec):
            n = _n_of(fraction, spec, L)
            # n = 0 prunes nothing: one cell, whatever the strategies, and its unhealed row is the baseline's.
            for strategy in (exp.strategy_values(spec) if n > 0 else ["none"]):
                for repair in (exp.repair_values(spec) if n > 0 else ["none"]):
                    calibrated = n > 0 and (strategy in USES_CALIBRATION or repair != "none")
                    for calibration in (calibrations if calibrated else calibrations[:1]):
                        prune_key = {"model": spec.name, "n": n, "strategy": strategy, "eval": evaluation_id,
                                     "dtype": exp.dtype,
                                     "calibration": CalibrationConfig.identity_of(calibration) if calibrated else None}
                        if repair != "none":  # a repair added later names only its own cells
                            prune_key["repair"] = repair
                        _add_cells(cells, owners, exp, spec, L, fraction, n, strategy, repair, calibration, prune_key,
                                   evaluation)
    if not cells:
        raise UserError("the experiment's grid is empty", "list at least one model, fraction and strategy")
    return list(cells.values())
