"""Which cells a sweep expects and where each one stands; the distance tables and the trust_remote_code models.

:func:`cell_status` and :func:`missing_cells` are the one account of "finished, stopped early, failed,
not run" that both the report and ``ray-prune status`` (:mod:`ray_prune.report.status`) print.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from ray_prune.core.distance import DistanceTable
from ray_prune.ledger.layout import TABLES
from ray_prune.ledger.schema import AXIS_COLUMNS
from ray_prune.ledger.storage import Storage
from ray_prune.report.frames import _fkey, _stage_rows, conformed

MISSING_COLUMNS = ["model", "strategy", "n", "fraction_removed", "state", "cell_id", "heal", "seed", "error"]
STATUS_COLUMNS = ["model", "expected", "finished", "stopped early", "failed", "not run", "baseline", "distance table"]


def expected_cells(record: Mapping[str, Any] | None) -> pd.DataFrame | None:
    """The cells the experiment expects (``experiment.json``): cell_id and model, plus strategy, n,
    fraction, num_layers, fraction_removed, heal settings and seed where the grid can be rebuilt."""
    if not record:
        return None
    spec = record.get("spec") or {}
    cells = spec.get("cells")
    if not cells:
        return None
    from ray_prune.sweep.experiment import Experiment
    from ray_prune.sweep.grid import expand

    base = pd.DataFrame(cells)
    try:
        grid = expand(Experiment(**spec["experiment"]), spec["layers"])
    except Exception as e:  # an older or newer schema: fall back to ids only
        warnings.warn(f"cannot rebuild the experiment's grid ({type(e).__name__}: {e}); "
                      "missing cells are listed by id only", stacklevel=2)
        return base
    info = pd.DataFrame([{
        "cell_id": c.cell_id, "strategy": c.strategy, "n": c.n, "fraction": c.fraction,
        "num_layers": c.num_layers, "fraction_removed": _fkey(c.n / c.num_layers), "seed": c.seed,
        "unhealed_id": c.unhealed_id, **{col: c.heal.get(col.removeprefix("heal_")) for col in AXIS_COLUMNS}}
        for c in grid])
    return base.merge(info, on="cell_id", how="left")


def _missing_row(c: pd.Series, state: str, error) -> dict[str, Any]:
    heal = [f"{k.removeprefix('heal_')}={c[k]}" for k in AXIS_COLUMNS if pd.notna(c[k])]
    n = c["n"]
    return {"model": c["model"], "strategy": c["strategy"], "n": int(n) if pd.notna(n) else None,
            "fraction_removed": c["fraction_removed"], "state": state, "cell_id": c["cell_id"],
            "heal": ", ".join(heal), "seed": c["seed"],
            "error": (str(error).strip().splitlines() or [""])[-1][:300] if error is not None and pd.notna(error)
            else ""}


def missing_cells(df: pd.DataFrame, expected: pd.DataFrame | None) -> pd.DataFrame:
    """Expected cells with no healed result: ``not run`` (no row at all) or ``failed`` (with the error).
    Cells stopped by ASHA are a result, not missing."""
    df, expected = conformed(df), conformed(expected)
    healed = {r["cell_id"]: r for _, r in df[df["stage"] == "healed"].iterrows()}
    out = []
    for _, c in expected.iterrows() if expected is not None else ():
        r = healed.get(c["cell_id"])
        if r is None:
            out.append(_missing_row(c, "not run", None))
        elif r["status"] not in ("finished", "stopped"):
            # the row says what the expected cell may not (a record whose grid cannot be rebuilt)
            out.append(_missing_row(c.combine_first(r), r["status"], r["error"]))
    known = set(expected["cell_id"]) if expected is not None else set()
    out += [_missing_row(r, "failed", r["error"]) for cell_id, r in healed.items()  # cells the record does not list
            if r["status"] == "failed" and cell_id not in known]
    res = pd.DataFrame(out, columns=MISSING_COLUMNS)
    return res.sort_values(["model", "strategy", "n", "cell_id"], kind="stable", na_position="last") \
        .reset_index(drop=True) if len(res) else res


def cell_status(df: pd.DataFrame, expected: pd.DataFrame | None, tables: Iterable[str] = ()) -> pd.DataFrame:
    """Per model: cells expected, finished, stopped early, failed and not run; baseline and distance table present."""
    df, expected = conformed(df), conformed(expected)
    healed = df[df["stage"] == "healed"]
    models = set(healed["model"]) | set(_stage_rows(df, "baseline", None)["model"])
    if expected is not None:
        models |= set(expected["model"])
    with_baseline = set(_stage_rows(df, "baseline")["model"])
    tables = set(tables)
    out = []
    for model in sorted(models):
        mine = healed[healed["model"] == model]
        status = dict(zip(mine["cell_id"], mine["status"]))
        want = set(expected.loc[expected["model"] == model, "cell_id"]) if expected is not None else set(status)
        counts = pd.Series([status[c] for c in want if c in status]).value_counts()
        out.append({"model": model, "expected": len(want), "finished": int(counts.get("finished", 0)),
                    "stopped early": int(counts.get("stopped", 0)), "failed": int(counts.get("failed", 0)),
                    "not run": len(want - set(status)),
                    "baseline": "yes" if model in with_baseline else "no",
                    "distance table": "yes" if model in tables else "no"})
    return pd.DataFrame(out, columns=STATUS_COLUMNS)


def load_tables(storage: Storage | str) -> dict[str, Any]:
    """Every distance table under ``<storage>/tables/``, keyed by model id."""
    storage = storage if isinstance(storage, Storage) else Storage(storage)
    tables = {}
    for rel in storage.list_files(TABLES, ".parquet"):
        try:
            local = storage.local_path(rel)
            if local is not None:
                t = DistanceTable.load(local)
            else:
                with tempfile.TemporaryDirectory() as d:
                    p = os.path.join(d, "t.parquet")
                    Path(p).write_bytes(storage.read_bytes(rel))
                    t = DistanceTable.load(p)
        except Exception as e:  # a corrupt table should not sink the whole report
            warnings.warn(f"skipping distance table {storage.path(rel)}: {e}", stacklevel=2)
            continue
        tables[t.model_id] = t
    return tables


def remote_code_models(record: Mapping[str, Any] | None, df: pd.DataFrame) -> list[str]:
    """Models that ran with trust_remote_code, from the experiment record and from the rows themselves."""
    df = conformed(df)
    found = set()
    spec = ((record or {}).get("spec") or {}).get("experiment") or {}
    for m in spec.get("models", []):
        if isinstance(m, Mapping) and m.get("trust_remote_code"):
            found.add(str(m.get("name")))
    found |= set(df.loc[df["trust_remote_code"].eq(True), "model"].astype(str))
    return sorted(found)
