"""Which cells a sweep expects and where each one stands; the distance tables and the trust_remote_code models.

:func:`cell_status` and :func:`missing_cells` are the one account of "finished, stopped early, failed,
not run" that both the report and ``ray-prune status`` (:mod:`ray_prune.report.status`) print.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import pandas as pd

from ray_prune.ledger.schema import AXIS_COLUMNS
from ray_prune.ledger.storage import Storage
from ray_prune.ledger.tables import read_distance_tables
from ray_prune.report.frames import conformed, fraction_key, stage_rows

MISSING_COLUMNS = ["model", "strategy", "n", "fraction_removed", "state", "cell_id", "heal", "seed", "error"]
STATUS_COLUMNS = ["model", "expected", "finished", "stopped early", "failed", "not run", "baseline", "distance table"]


def expected_cells(record: Mapping[str, Any] | None) -> pd.DataFrame | None:
    """The cells the experiment expects, as its record stores them (``experiment.json``): cell_id, model,
    strategy, n, fraction, num_layers, fraction_removed, heal settings and seed. Records of versions that stored
    only each cell's id and model give just those two columns (rows fill in the rest where they exist)."""
    if not record:
        return None
    cells = (record.get("spec") or {}).get("cells")
    if not cells:
        return None
    rows = []
    for c in cells:
        row = {"cell_id": c.get("cell_id"), "model": c.get("model")}
        if "n" in c and "num_layers" in c:
            heal = c.get("heal") or {}
            row.update({"strategy": c.get("strategy"), "n": c["n"], "fraction": c.get("fraction"),
                        "num_layers": c["num_layers"], "fraction_removed": fraction_key(c["n"] / c["num_layers"]),
                        "seed": c.get("seed"), "unhealed_id": c.get("unhealed_id"),
                        **{col: heal.get(col.removeprefix("heal_")) for col in AXIS_COLUMNS}})
        rows.append(row)
    return pd.DataFrame(rows)


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
    models = set(healed["model"]) | set(stage_rows(df, "baseline", None)["model"])
    if expected is not None:
        models |= set(expected["model"])
    with_baseline = set(stage_rows(df, "baseline")["model"])
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
    """Every distance table under ``<storage>/tables/`` that reads (``ledger.tables``), keyed by model id; where a
    model has several (an experiment with several calibration settings), by ``model [setting]``."""
    tables = read_distance_tables(storage if isinstance(storage, Storage) else Storage(storage))
    per_model: dict[str, int] = {}
    for t in tables:
        per_model[t.model_id] = per_model.get(t.model_id, 0) + 1
    return {(t.model_id if per_model[t.model_id] == 1 else f"{t.model_id} [{calibration_label(t)}]"): t
            for t in tables}


def calibration_label(table) -> str:
    """The calibration setting a table was made with, in a few words (``c4, angular, 128 x 1024``)."""
    cal = table.extra.get("calibration") or {}
    dataset = cal.get("dataset", "?")
    return f"{dataset}, {table.metric}, {table.samples} x {table.max_length}"


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
