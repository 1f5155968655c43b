"""The methods study's numbers, from a finished ``experiments/methods.yaml`` sweep: NUMBERS.md and the dataset.

    ray-prune sweep experiments/methods.yaml --storage docs/study/methods/run
    ray-prune report docs/study/methods/run --out docs/study/methods/report
    python docs/study/methods/summarize.py docs/study/methods/run

Writes ``results.parquet`` (every row), ``questions.parquet`` (every row's per-question outputs) and
``NUMBERS.md`` beside this file: the tables the write-up quotes, every difference between two rows paired on
the same questions (``core.evaluation.paired``) with its standard error, nothing typed by hand.
"""

from __future__ import annotations

import json
import math
import sys
from itertools import combinations
from pathlib import Path

import pandas as pd

from ray_prune.core.evaluation.paired import paired_difference
from ray_prune.core.evaluation.tasks import TASKS
from ray_prune.ledger.questions import load_questions
from ray_prune.ledger.rows import load_results
from ray_prune.report.compare import REFERENCE, method_label, row_costs, row_records

HERE = Path(__file__).resolve().parent


def _tasks(rows: pd.DataFrame) -> list[str]:
    columns = {t: f"{t}_{TASKS[t].main_metric}" for t in TASKS}
    return [t for t, c in columns.items() if c in rows and rows[c].notna().any()]


def _fmt(v: float, digits: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


class Study:
    """The finished rows of one model at one fraction (one n), their per-question records and their costs."""

    def __init__(self, rows: pd.DataFrame, baseline: pd.DataFrame, questions: pd.DataFrame) -> None:
        self.rows = rows
        self.baseline = baseline
        self.questions = questions
        self.model = str(rows["model"].iloc[0])
        self.n, self.num_layers = int(rows["n"].iloc[0]), int(rows["num_layers"].iloc[0])
        self.tasks = _tasks(rows)
        self.costs = row_costs(rows)

    @property
    def title(self) -> str:
        return f"{self.model}, n = {self.n} of {self.num_layers} layers ({self.n / self.num_layers:.0%})"

    def has(self, strategy: str, repair: str, stage: str) -> bool:
        return bool(((self.rows["strategy"] == strategy) & (self.rows["repair"] == repair)
                     & (self.rows["stage"] == stage)).any())

    def row(self, strategy: str, repair: str, stage: str) -> pd.Series:
        hit = self.rows[(self.rows["strategy"] == strategy) & (self.rows["repair"] == repair)
                        & (self.rows["stage"] == stage)]
        return hit.iloc[0]

    def records(self, r: pd.Series) -> list[dict]:
        return row_records(self.questions, r["cell_id"], r["stage"])

    def qa(self, r: pd.Series) -> float:
        """Mean of the tasks' main scores: the QA ranking's key."""
        return sum(float(r[f"{t}_{TASKS[t].main_metric}"]) for t in self.tasks) / len(self.tasks)

    def paired(self, a: pd.Series, b: pd.Series, task: str):
        return paired_difference(self.records(a), self.records(b), task, TASKS[task].main_metric)

    def mean_qa_paired(self, a: pd.Series, b: pd.Series) -> tuple[float, float]:
        """b - a of the mean QA score over the tasks, with its standard error (the tasks' questions are disjoint,
        so the variances of their paired means add, each weighted by 1 / tasks^2)."""
        parts = [self.paired(a, b, t) for t in self.tasks]
        k = len(parts)
        return sum(p.diff for p in parts) / k, math.sqrt(sum(p.stderr ** 2 for p in parts)) / k


def studies(root: str) -> list[Study]:
    """One :class:`Study` per (model, n) of the sweep, in the order of the experiment's models, then n."""
    df = load_results(root)
    rows = df[(df["status"] == "finished") & df["stage"].isin(["unhealed", "healed"])].copy()
    rows["repair"] = rows["repair"].fillna("none")
    questions = load_questions(root)
    record = json.loads((Path(root) / "experiment.json").read_text())  # the experiment's own order of models
    listed = [m["name"] for m in record["spec"]["experiment"]["models"]]
    order = {m: i for i, m in enumerate(listed + sorted(set(df["model"]) - set(listed)))}
    out = []
    for (model, _n), g in sorted(rows.groupby(["model", "n"]), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        out.append(Study(g, df[(df["stage"] == "baseline") & (df["model"] == model)],
                         questions[questions["cell_id"].isin(set(g["cell_id"]))]))
    return out


def rows_table(s: Study) -> str:
    ref = s.row(*REFERENCE)
    head = ["method", "stage", "removed layers", "C4 loss / ln V"] + [f"{t} ({TASKS[t].main_metric})" for t in s.tasks]
    head += ["mean QA − paper's", "cost s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in s.rows.sort_values(["stage", "strategy", "repair"], ascending=[False, True, True]).iterrows():
        d, se = s.mean_qa_paired(ref, r) if r["cell_id"] != ref["cell_id"] or r["stage"] != ref["stage"] else (0, 0)
        scores = [_fmt(r[f"{t}_{TASKS[t].main_metric}"]) for t in s.tasks]
        removed = ",".join(str(x) for x in r["removed_layers"])
        out.append(f"| {method_label(r['strategy'], r['repair'])} | {r['stage']} | {removed} | "
                   f"{_fmt(r['c4_loss_norm'])} | " + " | ".join(scores) + f" | {d:+.3f} ± {se:.3f} | "
                   f"{_fmt(s.costs.get((r['cell_id'], r['stage'])), 0)} |")
    base = s.baseline.iloc[0] if len(s.baseline) else None
    if base is not None:
        scores = [_fmt(base[f"{t}_{TASKS[t].main_metric}"]) for t in s.tasks]
        out.append(f"| unpruned | baseline | – | {_fmt(base['c4_loss_norm'])} | " + " | ".join(scores) + " | – | – |")
    return "\n".join(out)


def repair_against_heal(s: Study) -> str | None:
    """Q1: per strategy, the linear repair (no training) against the heal, and both together."""
    strategies = [st for st in sorted(s.rows["strategy"].unique())
                  if all(s.has(st, rep, stage) for rep in ("none", "linear") for stage in ("unhealed", "healed"))]
    if not strategies:
        return None
    head = ["strategy", "C4 plain", "C4 linear", "C4 healed", "C4 linear+healed", "share of the heal's C4 gain",
            "QA linear − plain (paired)", "QA linear − healed (paired)", "repair s", "heal s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for strategy in strategies:
        plain, lin = s.row(strategy, "none", "unhealed"), s.row(strategy, "linear", "unhealed")
        healed, both = s.row(strategy, "none", "healed"), s.row(strategy, "linear", "healed")
        gain = plain["c4_loss_norm"] - healed["c4_loss_norm"]
        share = (plain["c4_loss_norm"] - lin["c4_loss_norm"]) / gain if gain else math.nan
        d0, se0 = s.mean_qa_paired(plain, lin)
        d, se = s.mean_qa_paired(healed, lin)
        repair_s = float(both["load_s"]) - float(healed["load_s"])  # the linear cell's load includes the repair
        out.append(f"| {strategy} | {_fmt(plain['c4_loss_norm'])} | {_fmt(lin['c4_loss_norm'])} | "
                   f"{_fmt(healed['c4_loss_norm'])} | {_fmt(both['c4_loss_norm'])} | {_fmt(share, 2)} | "
                   f"{d0:+.3f} ± {se0:.3f} | {d:+.3f} ± {se:.3f} | {repair_s:.1f} | {float(healed['heal_s']):.1f} |")
    return "\n".join(out)


def selection_against_similarity(s: Study) -> str:
    """Q2: each strategy against similarity at the same fraction, repair and stage, task by task, paired."""
    head = ["strategy", "repair", "stage", "C4 − similarity"] + [f"{t} − similarity" for t in s.tasks]
    head += ["mean QA − similarity"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (repair, stage), g in s.rows.groupby(["repair", "stage"]):
        if not s.has("similarity", repair, stage):
            continue
        ref = s.row("similarity", repair, stage)
        for _, r in g[g["strategy"] != "similarity"].sort_values("strategy").iterrows():
            cells = []
            for t in s.tasks:
                p = s.paired(ref, r, t)
                cells.append(f"{p.diff:+.3f} ± {p.stderr:.3f} ({p.disagree} differ)")
            d, se = s.mean_qa_paired(ref, r)
            out.append(f"| {r['strategy']} | {repair} | {stage} | {r['c4_loss_norm'] - ref['c4_loss_norm']:+.3f} | "
                       + " | ".join(cells) + f" | {d:+.3f} ± {se:.3f} |")
    return "\n".join(out)


def kendall(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b of two rankings (ties counted in neither concordant nor discordant pairs)."""
    conc = disc = tx = ty = 0
    for i, j in combinations(range(len(x)), 2):
        a, b = x[i] - x[j], y[i] - y[j]
        if a == 0 and b == 0:
            continue
        if a == 0:
            tx += 1
        elif b == 0:
            ty += 1
        elif (a > 0) == (b > 0):
            conc += 1
        else:
            disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom else math.nan


def rankings(groups: list[Study]) -> str:
    """Q3: do the rows of one model and fraction rank alike by C4 loss (lower is better) and by mean QA (higher
    is better)? Distinct pruned models only: two cells that removed the same layers are one point."""
    out = ["| model, n | rows | count | Kendall tau (−C4 loss, mean QA) | best by C4 | best by QA |",
           "|---|---|---|---|---|---|"]
    for s in groups:
        for name, g in [("all", s.rows), *[(f"{st} only", s.rows[s.rows["stage"] == st])
                                           for st in ("unhealed", "healed")]]:
            g = g.drop_duplicates(["cell_id", "stage"])
            if len(g) < 2:
                continue
            neg_loss = [-float(v) for v in g["c4_loss_norm"]]
            qa = [s.qa(r) for _, r in g.iterrows()]
            labels = [f"{method_label(r['strategy'], r['repair'])} ({r['stage']})" for _, r in g.iterrows()]
            best_c4 = labels[max(range(len(g)), key=lambda i: neg_loss[i])]
            best_qa = labels[max(range(len(g)), key=lambda i: qa[i])]
            tau = kendall(neg_loss, qa)
            tau_text = "–" if math.isnan(tau) else f"{tau:+.2f}"
            out.append(f"| {s.model}, {s.n} | {name} | {len(g)} | {tau_text} | {best_c4} | {best_qa} |")
    return "\n".join(out)


def main(root: str) -> None:
    groups = studies(root)
    load_results(root).to_parquet(HERE / "results.parquet", index=False)
    load_questions(root).to_parquet(HERE / "questions.parquet", index=False)
    parts = ["# Methods study numbers", "",
             f"Written by `python docs/study/methods/summarize.py {root}` from the sweep's rows and per-question "
             "outputs; the write-up (README.md) quotes these tables. ± is one standard error; every difference "
             "between two rows is paired on the same questions. Cost: wall seconds of one 1-thread trial on this "
             "2-core CPU (`report.compare.row_costs`).", ""]
    for s in groups:
        parts += [f"## {s.title}", "", "### Every row", "", rows_table(s), ""]
        q1 = repair_against_heal(s)
        if q1:
            parts += ["### (1) The linear repair against the heal", "", q1, ""]
        parts += ["### (2) Each selection against similarity", "", selection_against_similarity(s), ""]
    parts += ["## (3) Rankings by C4 loss and by QA", "", rankings(groups), ""]
    (HERE / "NUMBERS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'NUMBERS.md'}, results.parquet, questions.parquet")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(HERE / "run"))
