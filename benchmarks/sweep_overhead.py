"""Sweep overhead and what profiling once and ASHA save, from one real sweep on local Ray.

Runs an experiment (default experiments/smoke.yaml) into a fresh storage folder,
then splits the wall time into the method's own work, read from the rows
(profile, evaluation and heal seconds), and everything else: Ray start,
scheduling, process start, model loads, writes. With one trial at a time
(2 cores here) the trial-slot time is the sweep's wall time.

Savings are computed against running every cell to the end with its own profile:
- profiling once per model saves profile_s x (cells of that model - 1);
- early stopping saves, for each stopped cell, the heal steps it did not run
  at the mean seconds per step of the finished cells of that model (an estimate).

    python benchmarks/sweep_overhead.py experiments/smoke.yaml
"""

from __future__ import annotations

import argparse
import tempfile
import time

from timing import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment", nargs="?", default="experiments/smoke.yaml")
    ap.add_argument("--storage", help="default: a fresh temporary folder")
    args = ap.parse_args()

    from ray_prune.experiment import load_experiment
    from ray_prune.sweep import run_sweep

    exp = load_experiment(args.experiment)
    storage = args.storage or tempfile.mkdtemp(prefix="ray-prune-bench-")
    t = time.perf_counter()
    df = run_sweep(exp, storage=storage, progress=False)
    wall = time.perf_counter() - t

    base = df[df["stage"] == "baseline"]
    unhealed = df[df["stage"] == "unhealed"]
    healed = df[(df["stage"] == "healed") & (df["status"] == "finished")]
    stopped = df[(df["stage"] == "healed") & (df["status"] == "stopped")]
    profile_s = base["profile_s"].fillna(0).sum()
    core = (profile_s + base["wall_s"].sum() + unhealed["eval_s"].fillna(0).sum()
            + healed["heal_s"].fillna(0).sum() + healed["eval_s"].fillna(0).sum())
    loads = healed["load_s"].fillna(0).sum()
    print(f"# sweep overhead on {machine()}: {args.experiment}, {len(healed)} finished + {len(stopped)} stopped cells")
    print("| quantity | seconds | share of wall |")
    print("|---|---|---|")
    print(f"| sweep wall time | {wall:.0f} | 1.00 |")
    print(f"| method work (profile + eval + heal) | {core:.0f} | {core / wall:.2f} |")
    print(f"| of the rest: model loads + prune in trials | {loads:.0f} | {loads / wall:.2f} |")
    print(f"| overhead (everything but method work) | {wall - core:.0f} | {(wall - core) / wall:.2f} |")

    cells = df[df["stage"] == "healed"].groupby("model").size()
    per_model_profile = base.set_index("model")["profile_s"].fillna(0)
    saved_profile = sum(per_model_profile.get(m, 0) * (k - 1) for m, k in cells.items())
    saved_asha = 0.0
    for model, group in stopped.groupby("model"):
        done = healed[healed["model"] == model]
        if len(done):
            per_step = (done["heal_s"] / done["steps_done"]).mean()
            saved_asha += ((group["heal_steps"] - group["steps_done"].fillna(0)) * per_step).sum()
    naive = wall + saved_profile + saved_asha
    print(f"profiling once per model saved {saved_profile:.0f} s ({saved_profile / naive:.1%} of the naive total); "
          f"ASHA saved ~{saved_asha:.0f} s ({saved_asha / naive:.1%}, estimate)")


if __name__ == "__main__":
    main()
