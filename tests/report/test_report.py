"""The sweep report: tables against hand-computed numbers, and the rendered folder of a small real sweep.

The real sweep is the tiny experiment of tests/tiny.yaml (a random-init 6-layer Llama with SmolLM2's
tokenizer on local Ray, 2 fractions x 2 strategies, 2 heal steps), run once for the module.
"""

from __future__ import annotations

import html
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ray_prune import report
from ray_prune.ledger.rows import load_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- hand-made frames


def _row(**kw):
    base = {"experiment": "x", "status": "finished", "family": "llama", "num_layers": 10, "heal_lr": 3e-4,
            "heal_rank": 8, "heal_steps": 100, "heal_batch_size": 2, "heal_seq_len": 32, "heal_quantize": "none",
            "device": "cpu", "gpu_s": 0.0}
    base.update(kw)
    if "n" in base and "fraction_removed" not in base:
        base["fraction_removed"] = base["n"] / base["num_layers"]
    return base


def _scores_frame():
    """Model m (L=10): baseline 60%; similarity healed 59.5, 58.5, 50, 59 at n=1..4; deepest fails at once."""
    rows = [_row(model="m", stage="baseline", strategy="none", n=0, cell_id="b", boolq_acc=0.60,
                 boolq_acc_stderr=0.02)]
    for n, acc in zip((1, 2, 3, 4), (0.595, 0.585, 0.50, 0.59)):
        rows.append(_row(model="m", stage="healed", strategy="similarity", n=n, cell_id=f"s{n}", boolq_acc=acc,
                         boolq_acc_stderr=0.02, heal_val_loss=3.0))
        rows.append(_row(model="m", stage="unhealed", strategy="similarity", n=n, cell_id=f"us{n}",
                         boolq_acc=acc - 0.1, boolq_acc_stderr=0.02))
    for n, acc in zip((1, 2), (0.40, 0.60)):
        rows.append(_row(model="m", stage="healed", strategy="deepest", n=n, cell_id=f"d{n}", boolq_acc=acc,
                         boolq_acc_stderr=0.02, heal_val_loss=3.0))
    return pd.DataFrame(rows)


def test_safe_fractions_strict_monotone_definition():
    safe = report.safe_fractions(_scores_frame(), tolerances=(1, 2, 5, 15, 20)).set_index("strategy")
    sim = safe.loc["similarity"]
    assert sim["baseline"] == pytest.approx(60.0)
    # 1 point: 59.5 >= 59 at 0.1, 58.5 < 59 at 0.2 -> 0.1
    assert sim["f_within_1pt"] == pytest.approx(0.1) and sim["n_within_1pt"] == 1
    # 2 points: 0.1 and 0.2 qualify, 0.3 (50%) fails; 0.4 (59%) qualifies again but the chain has ended
    assert sim["f_within_2pt"] == pytest.approx(0.2) and sim["n_within_2pt"] == 2
    assert sim["f_within_5pt"] == pytest.approx(0.2)
    # 15 points: every grid fraction qualifies: the largest, flagged as a lower bound
    assert sim["f_within_15pt"] == pytest.approx(0.4) and "15/20 pt: every grid fraction qualifies" in sim["note"]
    deep = safe.loc["deepest"]
    assert deep["f_within_15pt"] == 0.0  # 40% < 45% already at the first fraction
    assert deep["f_within_20pt"] == pytest.approx(0.2)  # 40% >= 40% counts (">=" at the boundary)


def test_safe_fractions_missing_point_ends_the_chain_and_best_heal_setting_is_used():
    df = _scores_frame()
    # n=2 of the similarity strategy failed: no healed score there
    df.loc[(df["cell_id"] == "s2"), ["status", "boolq_acc"]] = ["failed", np.nan]
    # a second heal setting at n=1 with a better validation loss and a worse score: it is the one used
    df = pd.concat([df, pd.DataFrame([_row(model="m", stage="healed", strategy="similarity", n=1, cell_id="s1b",
                                           heal_lr=1e-3, boolq_acc=0.52, boolq_acc_stderr=0.02,
                                           heal_val_loss=2.0)])], ignore_index=True)
    safe = report.safe_fractions(df, tolerances=(10,)).set_index("strategy").loc["similarity"]
    assert safe["f_within_10pt"] == pytest.approx(0.1)  # 52 >= 50 at 0.1, then 0.2 has no result
    assert "10 pt: chain ends at f=0.2: no healed score (failed)" in safe["note"]
    strict = report.safe_fractions(df, tolerances=(5,)).set_index("strategy").loc["similarity"]
    assert strict["f_within_5pt"] == 0.0  # 52 < 55: the better-loss setting's score counts, not the best score
    # an expected cell that never ran (known from the experiment record) also ends the chain
    expected = pd.DataFrame([{"model": "m", "strategy": "deepest", "n": 3, "num_layers": 10,
                              "fraction_removed": 0.3}])
    deep = report.safe_fractions(_scores_frame(), tolerances=(25,), expected=expected).set_index("strategy")
    assert deep.loc["deepest", "f_within_25pt"] == pytest.approx(0.2)
    assert "chain ends at f=0.3: no healed score (not run)" in deep.loc["deepest", "note"]


def test_safe_fractions_without_baseline_or_metric():
    df = _scores_frame()
    no_base = report.safe_fractions(df[df["stage"] != "baseline"], tolerances=(1,))
    assert no_base["f_within_1pt"].isna().all() and no_base["note"].str.contains("no baseline").all()
    assert report.available_metrics(df) == ["boolq_acc"]
    assert report.available_metrics(df.drop(columns=["boolq_acc", "boolq_acc_stderr"])) == []


def _cost_frame():
    cpu = dict(model="cpu-model", num_layers=10, heal_steps=100)
    rows = [
        _row(**cpu, stage="baseline", strategy="none", n=0, cell_id="b", wall_s=100.0, profile_s=50.0),
        _row(**cpu, stage="unhealed", strategy="deepest", n=2, cell_id="u1", unhealed_id="u1", wall_s=20.0,
             finished_at="2025-01-01T00:00:01Z"),
        # the trial that ran the unhealed evaluation (earliest finished of u1): 200 s includes its 20 s
        _row(**cpu, stage="healed", strategy="deepest", n=2, cell_id="h1", unhealed_id="u1", wall_s=200.0,
             heal_s=150.0, steps_done=100, finished_at="2025-01-01T00:00:05Z"),
        _row(**cpu, stage="healed", strategy="deepest", n=2, cell_id="h2", unhealed_id="u1", wall_s=180.0,
             heal_s=140.0, steps_done=100, seed=1, finished_at="2025-01-01T00:00:09Z"),
        # stopped at 25 of 100 steps: no time recorded (another learning rate: the same time per step)
        {**_row(**cpu, stage="healed", strategy="deepest", n=2, cell_id="h3", unhealed_id="u1", steps_done=25,
                heal_lr=1e-2, status="stopped"), "gpu_s": np.nan, "device": None},
        {**_row(**cpu, stage="healed", strategy="deepest", n=2, cell_id="h4", unhealed_id="u1", status="failed"),
         "gpu_s": np.nan, "device": None},
    ]
    gpu = dict(model="gpu-model", num_layers=10, heal_steps=100, device="cuda:0")
    rows += [
        _row(**gpu, stage="baseline", strategy="none", n=0, cell_id="gb", wall_s=36.0, gpu_s=72.0, profile_s=18.0),
        _row(**gpu, stage="healed", strategy="deepest", n=2, cell_id="g1", unhealed_id="gu", wall_s=360.0,
             gpu_s=720.0, heal_s=300.0, steps_done=100),
    ]
    return pd.DataFrame(rows)


def test_cost_table_by_hand():
    cost = report.cost_table(_cost_frame()).set_index(["model", "stage"])
    h = 3600.0
    c = cost.loc["cpu-model"]
    assert c.loc["profile", "cpu_hours"] == pytest.approx(50 / h)
    assert c.loc["baseline", "cpu_hours"] == pytest.approx(100 / h)
    assert c.loc["unhealed", "cpu_hours"] == pytest.approx(20 / h)
    assert c.loc["healed", "cpu_hours"] == pytest.approx((200 - 20 + 180) / h)
    assert c.loc["healed", "rows"] == 2
    assert c.loc["total (measured)", "cpu_hours"] == pytest.approx((50 + 100 + 20 + 180 + 180) / h)
    mean_heal = (150 + 140) / 2
    assert c.loc["stopped (est.)", "cpu_hours"] == pytest.approx(0.25 * mean_heal / h)
    assert c.loc["saved by early stopping (est.)", "cpu_hours"] == pytest.approx(0.75 * mean_heal / h)
    assert c.loc["saved by early stopping (est.)", "estimated"] and not c.loc["healed", "estimated"]
    assert c.loc["total incl. stopped (est.)", "cpu_hours"] == pytest.approx((530 + 0.25 * mean_heal) / h)
    assert c.loc["failed", "rows"] == 1 and math.isnan(c.loc["failed", "cpu_hours"])
    assert (c["gpu_hours"].fillna(0) == 0).all()
    g = cost.loc["gpu-model"]
    assert g.loc["baseline", "gpu_hours"] == pytest.approx(72 / h)
    assert g.loc["profile", "gpu_hours"] == pytest.approx(2 * 18 / h)  # on the baseline's 2 GPUs
    assert g.loc["healed", "gpu_hours"] == pytest.approx(720 / h) and g.loc["healed", "cpu_hours"] == 0
    total = cost.loc["(all models)", "total (measured)"]
    assert total["cpu_hours"] == pytest.approx(530 / h) and total["gpu_hours"] == pytest.approx((72 + 36 + 720) / h)


def test_plot_functions_on_a_hand_made_frame():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = _scores_frame()
    df["c4_loss_norm"] = 0.5
    df["curve_step"] = [[1, 2, 3]] * len(df)
    df["curve_val_loss"] = [[3.0, 2.5, 2.2]] * len(df)
    df.loc[df["cell_id"] == "d2", ["status", "curve_step", "curve_val_loss"]] = ["stopped", None, None]
    df.at[df.index[df["cell_id"] == "d2"][0], "curve_step"] = [1]
    df.at[df.index[df["cell_id"] == "d2"][0], "curve_val_loss"] = [3.1]
    expected = pd.DataFrame([{"model": "m", "strategy": "deepest", "n": 3, "fraction_removed": 0.3}])
    ax = report.plot_metric(df, "boolq", expected=expected)
    deep = [line for line in ax.lines if line.get_linestyle() == "--" and len(line.get_xdata()) == 4]
    assert deep and any(np.isnan(line.get_ydata()).any() for line in deep)  # a gap at 0.3, not interpolated
    assert any(line.get_marker() == "x" for line in ax.lines)  # ... marked as missing
    assert ax.get_legend() is not None and "random guess" in " ".join(t.get_text() for t in ax.get_legend().texts)
    fig = report.plot_heal_curves(df)
    assert any(line.get_marker() == "x" for a in fig.axes for line in a.lines)  # the stopped cell
    report.plot_loss(df)
    with pytest.raises(KeyError):
        report.plot_metric(df, "mmlu")
    plt.close("all")


def test_report_module_does_not_import_ray(tmp_path):
    """write_report on a hand-built storage, in a fresh interpreter: neither Ray nor torch is imported."""
    code = f"""
import sys, numpy as np
from ray_prune.core.distance import DistanceTable
from ray_prune.ledger.rows import write_row
from ray_prune.ledger.storage import Storage
import ray_prune.report as r
s = Storage({str(tmp_path)!r})
d = np.abs(np.subtract.outer(np.arange(5.0), np.arange(5.0))) / 10
DistanceTable("m", "angular", 4, d, 8, 64, "h", 32).save(s.local_path("tables/m.parquet"))
write_row(s, dict(experiment="x", cell_id="b", stage="baseline", status="finished", model="m", strategy="none",
                  n=0, num_layers=4, fraction_removed=0.0, c4_loss_norm=0.6, wall_s=1.0, gpu_s=0.0))
index = r.write_report({str(tmp_path)!r}, None)
assert index.is_file(), index
assert "ray" not in sys.modules, "report imported ray"
assert "torch" not in sys.modules, "report imported torch"
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "report" / "distance_m.png").is_file() and (tmp_path / "report" / "lstar.png").is_file()


def test_remote_storage_needs_out():
    from ray_prune.errors import UserError

    with pytest.raises(UserError, match="--out"):
        report.write_report("s3://some-bucket/run")


# ----------------------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def sweep(tiny_sweep, tmp_path_factory):
    """A copy of the session's tiny sweep: the tests here edit its record and delete a row, which the other
    modules that read the shared sweep must not see."""
    import shutil

    copy = tmp_path_factory.mktemp("report-sweep") / "store"
    shutil.copytree(tiny_sweep, copy)
    return copy


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _links(index: Path) -> list[str]:
    text = index.read_text(encoding="utf-8")
    return re.findall(r"""(?:src|href)=['"]([^'"#][^'"]*)['"]""", text)


def test_report_of_a_real_sweep(sweep, tmp_path):
    from PIL import Image

    from ray_prune.cli import main

    out = tmp_path / "rep"
    assert main(["report", str(sweep), "--out", str(out)]) == 0
    index = out / "index.html"
    assert index.is_file()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["distance_tiny-llama.png", "heal_curves.png", "loss.png", "lstar.png", "metric_boolq_acc.png",
                    "quality_cost.png"]
    for name in pngs:
        w, h = _png_size(out / name)
        assert w >= 600 and h >= 300, (name, w, h)
        with Image.open(out / name) as im:
            im.verify()
    links = _links(index)
    assert set(pngs) <= set(links)
    for link in links:
        assert "://" not in link and (out / link).is_file(), f"broken link {link}"
    for csv in ("safe_fractions.csv", "cost.csv", "missing_cells.csv", "cell_status.csv", "results.csv",
                "methods.csv"):
        assert csv in links
    # Methods against the paper's (similarity, healed) on the same questions: the paired difference and its error.
    methods = pd.read_csv(out / "methods.csv")
    rows = load_results(str(sweep)).set_index(["strategy", "n", "stage"])
    deep = methods[(methods["method"] == "deepest") & (methods["stage"] == "healed") & (methods["n"] == 3)].iloc[0]
    want = rows.loc[("deepest", 3, "healed"), "boolq_acc"] - rows.loc[("similarity", 3, "healed"), "boolq_acc"]
    assert deep["boolq_diff"] == pytest.approx(want) and deep["boolq_diff_se"] >= 0
    ref = methods[(methods["method"] == "similarity") & (methods["stage"] == "healed") & (methods["n"] == 3)]
    assert ref["boolq_diff"].iloc[0] == 0 and bool(ref["is_reference"].iloc[0])

    df = load_results(str(sweep))
    # safe fractions, by hand: the healed BoolQ accuracy at each fraction against the baseline's
    safe = pd.read_csv(out / "safe_fractions.csv").set_index("strategy")
    base = df[df["stage"] == "baseline"]["boolq_acc"].iloc[0]
    for strategy in ("similarity", "deepest"):
        healed = df[(df["stage"] == "healed") & (df["strategy"] == strategy)].sort_values("n")
        assert list(healed["n"]) == [1, 3]
        for k in (1, 2, 5):
            want = 0.0
            for f, acc in zip(healed["fraction_removed"], healed["boolq_acc"]):
                if acc < base - k / 100 - 1e-12:
                    break
                want = f
            assert safe.loc[strategy, f"f_within_{k}pt"] == pytest.approx(want), (strategy, k)
        assert safe.loc[strategy, "baseline"] == pytest.approx(100 * base)
    # cost, by hand: CPU wall hours; every unhealed evaluation ran inside a finished trial
    cost = pd.read_csv(out / "cost.csv").set_index(["model", "stage"]).loc["(all models)"]
    h = 3600.0
    un = df[df["stage"] == "unhealed"]["wall_s"].sum()
    healed_wall = df[df["stage"] == "healed"]["wall_s"].sum()
    b = df[df["stage"] == "baseline"]
    assert cost.loc["unhealed", "cpu_hours"] == pytest.approx(un / h)
    assert cost.loc["healed", "cpu_hours"] == pytest.approx((healed_wall - un) / h)
    assert cost.loc["total (measured)", "cpu_hours"] == pytest.approx(
        (b["wall_s"].sum() + b["profile_s"].sum() + healed_wall) / h)
    assert (cost["gpu_hours"].fillna(0) == 0).all()
    status = pd.read_csv(out / "cell_status.csv").iloc[0]
    assert (status["expected"], status["finished"], status["not run"]) == (4, 4, 0)
    assert pd.read_csv(out / "missing_cells.csv").empty
    assert len(pd.read_csv(out / "results.csv")) == len(df)

    # trust_remote_code: off here, and said so; a record saying it was on is shown as a warning.
    assert "was off for every model" in index.read_text(encoding="utf-8")
    assert not pd.read_csv(out / "results.csv")["trust_remote_code"].any()
    record = json.loads((sweep / "experiment.json").read_text())
    model = record["spec"]["experiment"]["models"][0]
    model["trust_remote_code"] = True
    (sweep / "experiment.json").write_text(json.dumps(record))
    text = report.write_report(str(sweep), str(out)).read_text(encoding="utf-8")
    assert "Remote code ran" in text and html.escape(model["name"]) in text.split("Remote code ran")[1][:2000]
    model["trust_remote_code"] = False
    (sweep / "experiment.json").write_text(json.dumps(record))

    # A partial sweep: one healed result is lost; re-rendering lists it and leaves a gap.
    victim = df[(df["stage"] == "healed") & (df["strategy"] == "deepest") & (df["n"] == 3)].iloc[0]
    files = list((sweep / "results").rglob(f"{victim['cell_id']}-healed.parquet"))
    assert len(files) == 1
    files[0].unlink()
    (out / "metric_mmlu_acc.png").write_bytes(PNG_MAGIC)  # a stale figure of an earlier report ...
    (out / "my_notes.png").write_bytes(PNG_MAGIC)  # ... and a file of the user's
    index = report.write_report(str(sweep), str(out))  # the same folder: the old report's files are replaced
    assert not (out / "metric_mmlu_acc.png").exists() and (out / "my_notes.png").exists()
    missing = pd.read_csv(out / "missing_cells.csv")
    assert list(missing["cell_id"]) == [victim["cell_id"]] and list(missing["state"]) == ["not run"]
    assert (missing["strategy"].iloc[0], missing["n"].iloc[0]) == ("deepest", 3)
    assert victim["cell_id"] in index.read_text(encoding="utf-8")
    status = pd.read_csv(out / "cell_status.csv").iloc[0]
    assert (status["finished"], status["not run"]) == (3, 1)
    safe = pd.read_csv(out / "safe_fractions.csv").set_index("strategy")
    note = safe.loc["deepest", "note"]
    assert "chain ends at f=0.5: no healed score (not run)" in str(note) or safe.loc["deepest", "f_within_5pt"] == 0.0
    for link in _links(index):
        assert (out / link).is_file(), f"broken link {link}"
    for name in pngs:
        assert _png_size(out / name)[0] >= 600
