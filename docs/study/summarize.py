"""The study's numbers, from a finished ``experiments/study.yaml`` sweep: the dataset and the tables of NUMBERS.md.

    ray-prune sweep experiments/study.yaml
    ray-prune report results/study --out docs/study/report
    python docs/study/summarize.py results/study

Writes ``docs/study/results.parquet`` (every row of the sweep, in the sweep's declared schema),
``docs/study/run/`` (the sweep's own ledger: its row files, distance tables and experiment record, so that
``cp -r docs/study/run results/study && ray-prune sweep experiments/study.yaml`` runs only the cells not yet
finished) and ``docs/study/NUMBERS.md`` (the tables the write-up quotes: each figure with its standard
error, each from the rows, nothing typed by hand).
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pandas as pd

from ray_prune.core.evaluation.tasks import TASKS
from ray_prune.core.select import optimal_starts
from ray_prune.ledger.rows import load_results
from ray_prune.report.cells import load_tables

HERE = Path(__file__).resolve().parent
QA = ("arc_easy", "piqa", "hellaswag", "boolq", "mmlu")


def _fmt(v: float, e: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.3f}" if e is None or math.isnan(e) else f"{v:.3f} ± {e:.3f}"


def lstar_table(tables) -> str:
    """(i): l*(n) and its distance for every n, per model, with whether the block ends at the last layer."""
    out = ["| model | n | l*(n) | block | d(x^l*, x^l*+n) | ends at the last block |", "|---|---|---|---|---|---|"]
    for model, t in tables.items():
        for n, l, d in optimal_starts(t):
            last = "yes" if l + n == t.num_layers else "no"
            out.append(f"| {model} | {n} | {l} | {l}..{l + n - 1} | {d:.3f} | {last} |")
    return "\n".join(out)


def loss_table(df: pd.DataFrame) -> str:
    """(ii), (iii): C4 loss / ln V before and after healing, per model, strategy and fraction."""
    rows = df[df["status"] == "finished"]
    out = ["| model | strategy | fraction | n | unhealed loss/lnV | healed loss/lnV | healed − unhealed |",
           "|---|---|---|---|---|---|---|"]
    base = rows[rows["stage"] == "baseline"].set_index("model")["c4_loss_norm"]
    for (model, strategy, f), g in rows[rows["stage"] != "baseline"].groupby(["model", "strategy", "fraction"]):
        un = g.loc[g["stage"] == "unhealed", "c4_loss_norm"]
        he = g.loc[g["stage"] == "healed", "c4_loss_norm"]
        u = float(un.iloc[0]) if len(un) else (float(base[model]) if f == 0 else float("nan"))
        h = float(he.iloc[0]) if len(he) else float("nan")
        n = int(g["n"].iloc[0])
        out.append(f"| {model} | {strategy} | {f:.2f} | {n} | {_fmt(u)} | {_fmt(h)} | {_fmt(h - u)} |")
    for model, v in base.items():
        out.append(f"| {model} | (unpruned baseline) | 0.00 | 0 | {_fmt(float(v))} | – | – |")
    return "\n".join(out)


def qa_table(df: pd.DataFrame) -> str:
    """(iv): each task's main metric ± standard error on the baseline and every healed model, beside chance."""
    rows = df[(df["status"] == "finished") & df["stage"].isin(["baseline", "healed"])]
    cols = [(t, f"{t}_{TASKS[t].main_metric}") for t in QA]
    head = " | ".join(f"{TASKS[t].label} ({TASKS[t].main_metric}, chance {TASKS[t].random_acc:.2f}, "
                      f"n={int(rows[f'{t}_n'].max()) if f'{t}_n' in rows else 0})" for t, _ in cols)
    out = [f"| model | strategy | fraction | {head} |", "|---|---|---|" + "---|" * len(cols)]
    rows = rows.sort_values(["model", "stage", "strategy", "fraction"])
    for _, r in rows.iterrows():
        strategy = "(unpruned)" if r["stage"] == "baseline" else r["strategy"]
        vals = " | ".join(_fmt(r.get(c), r.get(f"{c}_stderr")) for _, c in cols)
        out.append(f"| {r['model']} | {strategy} | {0.0 if r['stage'] == 'baseline' else r['fraction']:.2f} | {vals} |")
    return "\n".join(out)


def timing_line(df: pd.DataFrame) -> str:
    done = df[df["status"] == "finished"]
    return (f"{len(done)} finished rows; trial time summed over rows: heal {done['heal_s'].sum() / 60:.1f} min, "
            f"evaluation {done['eval_s'].sum() / 60:.1f} min")


def main(storage: str) -> int:
    df = load_results(storage)
    tables = load_tables(storage)
    df.to_parquet(HERE / "results.parquet", index=False)
    run = HERE / "run"
    shutil.rmtree(run, ignore_errors=True)
    for part in ("results", "tables"):
        shutil.copytree(Path(storage, part), run / part, ignore=shutil.ignore_patterns(".*"))
    shutil.copyfile(Path(storage, "experiment.json"), run / "experiment.json")
    text = "\n\n".join([
        "# Study numbers\n\nWritten by `python docs/study/summarize.py results/study` from the sweep's rows; "
        "the write-up (README.md) quotes these tables.",
        "## (i) l*(n), the start of the most similar block of n layers\n\n" + lstar_table(tables),
        "## (ii), (iii) C4 loss / ln V (test role), before and after healing\n\n" + loss_table(df),
        "## (iv) Question answering: unpruned baselines and healed models\n\n" + qa_table(df),
        "## Cost\n\n" + timing_line(df),
    ])
    (HERE / "NUMBERS.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "results/study"))
