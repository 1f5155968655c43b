"""Read a sweep's state from storage alone: no Ray, no models, safe to run while a sweep is going."""

from __future__ import annotations

from collections import Counter

from ray_prune.results import load_results, read_experiment_record
from ray_prune.storage import Storage

SUMMARY_METRICS = ("mmlu_acc", "boolq_acc", "arc_easy_acc", "c4_loss_norm")


def summary_table(df) -> str:
    """Unpruned baseline, then unhealed/healed scores per model, strategy and n."""
    if df.empty:
        return "no results yet"
    metrics = [m for m in SUMMARY_METRICS if m in df.columns]
    ok = df[df["status"] == "finished"]
    cols = ["model", "strategy", "n", "fraction_removed", "stage", "heal_lr", "heal_rank"] + metrics
    cols = [c for c in cols if c in ok.columns]
    view = ok[cols].sort_values(["model", "stage", "strategy", "n"], kind="stable")
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_rows", 500, "display.float_format", "{:.4f}".format):
        text = view.to_string(index=False)
    other = df[df["status"] != "finished"]
    if len(other):
        text += f"\n{len(other)} cell(s) not finished: " + ", ".join(
            f"{s}={c}" for s, c in Counter(other["status"]).items())
    return text


def status_report(uri: str) -> str:
    storage = Storage(uri)
    record = read_experiment_record(storage)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # corrupt files are listed below instead
        df = load_results(uri)
    lines = []
    if record is None:
        lines.append(f"{uri}: no experiment record (not a ray-prune sweep, or it never started)")
        expected: dict[str, set[str]] = {}
    else:
        lines.append(f"experiment {record['name']} at {storage.uri}")
        expected = {}
        for c in record["spec"].get("cells", []):
            expected.setdefault(c["model"], set()).add(c["cell_id"])
    healed = df[df["stage"] == "healed"] if len(df) else df
    models = sorted(set(expected) | set(healed["model"]) if len(healed) else set(expected))
    for model in models:
        rows = healed[healed["model"] == model] if len(healed) else healed
        status = dict(zip(rows["cell_id"], rows["status"])) if len(rows) else {}
        counts = Counter(status.values())
        want = expected.get(model, set(status))
        missing = len(want - set(status))
        lines.append(f"  {model}: {len(want)} cells: {counts['finished']} finished, {counts['stopped']} stopped early, "
                     f"{counts['failed']} failed, {missing} not run")
        for _, r in rows[rows["status"] == "failed"].iterrows():
            lines.append(f"    failed {r['cell_id']} (n={r['n']}, {r['strategy']}): {str(r['error'])[:200]}")
    corrupt = df.attrs.get("corrupt_files", [])
    if corrupt:
        lines.append(f"  {len(corrupt)} corrupt result file(s), skipped (their cells will be rerun):")
        lines.extend(f"    {p}" for p in corrupt)
    return "\n".join(lines)
