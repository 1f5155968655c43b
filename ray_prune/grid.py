"""Expand an experiment into cells, each with a hash of everything that shapes its result.

The hash is the ledger key: a rerun skips every cell whose hash already has a
finished row, and adding a fraction or a model adds only new hashes. The code
version is recorded in every row but deliberately left out of the hash, so an
upgrade of ray-prune does not invalidate a week of GPU time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ray_prune.errors import UserError
from ray_prune.experiment import BUNDLED_LAYERS, Experiment, ModelSpec, stable_hash
from ray_prune.select import check_n, n_from_fraction


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
    heal: dict[str, Any]
    calibration: dict[str, Any]
    eval: dict[str, Any]
    dtype: str
    cell_id: str = ""
    unhealed_id: str = ""
    owns_unhealed: bool = False  # one cell per pruned model evaluates it unhealed
    removed_layers: list[int] = field(default_factory=list)  # filled in once the model is profiled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cell":
        return cls(**d)


def model_num_layers(spec: ModelSpec) -> int:
    """L from the config alone (no weights), so grids are checked before anything heavy runs."""
    if spec.name in BUNDLED_LAYERS:
        return BUNDLED_LAYERS[spec.name]
    from transformers import AutoConfig

    from ray_prune.architecture import family_of
    from ray_prune.models import resolve

    try:
        config = AutoConfig.from_pretrained(resolve(spec.name), trust_remote_code=spec.trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot read the config of model {spec.name!r}: {str(e).splitlines()[0]}",
                        "check the hub id or local path (and HF_TOKEN for gated models)") from None
    family_of(config)
    return int(config.num_hidden_layers)


def expand(exp: Experiment, num_layers: dict[str, int]) -> list[Cell]:
    """All cells of the grid, deduplicated (two fractions that round to the same n are one cell)."""
    cells: dict[str, Cell] = {}
    owners: set[str] = set()
    calibration = exp.calibration.model_dump()
    evaluation = exp.eval.model_dump()
    for spec in exp.models:
        L = num_layers[spec.name]
        for fraction in exp.fraction_values():
            try:
                n = n_from_fraction(fraction, L)
            except UserError:
                raise UserError(f"fraction {fraction} of {spec.name}'s {L} layers rounds to n={round(fraction * L)}, "
                                f"which leaves no layer", "use fractions below 1 - 0.5/L") from None
            check_n(n, L)
            for strategy in exp.strategies:
                prune_key = {"model": spec.name, "n": n, "strategy": strategy, "eval": evaluation, "dtype": exp.dtype,
                             "calibration": calibration if strategy == "similarity" and n > 0 else None}
                unhealed_id = stable_hash(prune_key)
                for heal in exp.heal_points(spec):
                    for seed in exp.seeds:
                        cell_id = stable_hash({**prune_key, "heal": heal, "seed": seed})
                        if cell_id in cells:
                            continue
                        cells[cell_id] = Cell(
                            experiment=exp.name, model=spec.name, trust_remote_code=spec.trust_remote_code,
                            num_layers=L, fraction=fraction, n=n, strategy=strategy, seed=seed, heal=heal,
                            calibration=calibration, eval=evaluation, dtype=exp.dtype, cell_id=cell_id,
                            unhealed_id=unhealed_id, owns_unhealed=unhealed_id not in owners)
                        owners.add(unhealed_id)
    if not cells:
        raise UserError("the experiment's grid is empty", "list at least one model, fraction and strategy")
    return list(cells.values())
