"""The cost plan against a finished sweep: predicted seconds per model and stage beside the seconds its rows recorded.

Given a sweep's storage root and its experiment file, this probes each model on this machine (``core.probe``, the
rates ``ray-prune sweep --check --probe`` prices with; cached, ``--force`` measures again), predicts every row's
seconds from ``core.cost`` for the row's own cell (its kept blocks, its heal, its evaluation), and prints, per model
and stage, the predicted and measured seconds summed over the rows and their ratio (1.0 is a perfect plan; above 1
the plan over-estimates). Stages, and the row columns they are measured by:

- ``profile``: the distance table (baseline row ``profile_s``, which excludes the load);
- ``baseline``: the unpruned model's evaluation (baseline row ``wall_s``);
- ``load``: a trial's model load and in-memory prune (healed row ``load_s``);
- ``unhealed``: the pruned model's evaluation before healing (unhealed row ``eval_s``);
- ``heal``: heal steps and validation losses (healed row ``heal_s``), and ``tokens_seen`` against the plan's tokens;
- ``healed``: the healed model's evaluation (healed row ``eval_s``);
- ``trial``: a trial from its load to its last row (healed row ``wall_s``: the above, plus LoRA set-up and saving
  the adapter, which the plan does not count).

Run it on the machine (and at the CPU threads, ``resources.cpus_per_trial``) the sweep ran on: the probe measures
this machine. Trials that ran two at a time on shared cores ran slower than the probe, which runs alone.

    python benchmarks/cost_vs_measured.py results/study experiments/study.yaml
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


def _predicted(arch, w, cell, stage: str, rates, exp) -> float:
    """Seconds the plan predicts for one row of ``cell``."""
    from ray_prune.core import cost
    from ray_prune.core.calibration import CalibrationConfig

    kept = cell.num_layers - cell.n
    if stage == "unhealed":
        works = cost.evaluation_work(arch, kept, w.evaluation, tasks=exp.eval.unhealed is True)
    elif stage == "heal":
        works = cost.heal_work(arch, kept, cell.heal_config())
    elif stage == "healed":
        lora = cost.adapter_params(arch, kept, cell.heal_config()) if w.scored_precision() == "nf4" else 0
        works = cost.evaluation_work(arch, kept, w.evaluation, lora=lora)
    elif stage == "load":  # load_s: the first load, and the repair fit where the cell repairs
        works = cost.load_work(arch, 1)
        if cell.repair != "none":
            works += cost.repair_work(arch, kept, CalibrationConfig.from_dict(cell.calibration))
    else:
        raise ValueError(stage)
    return sum(rates.seconds(x) for x in works)


def compare(storage: str, experiment: str, force: bool = False):
    """([(model, stage, rows, predicted s, measured s)] for every model and stage the sweep's rows record, the cost
    plan with the probed rates)."""
    from ray_prune.core import cost
    from ray_prune.ledger.rows import load_results
    from ray_prune.sweep.cost_plan import plan_costs, stage1_work
    from ray_prune.sweep.experiment import load_experiment
    from ray_prune.sweep.memory_plan import workload
    from ray_prune.sweep.plan import plan

    exp = load_experiment(experiment)
    p = plan(exp, storage, check=True)
    planned = plan_costs(p, cost.DEFAULT_GPU, probe=True, force=force)
    costs = {c.model: c for c in planned.costs}
    df = load_results(storage)
    df = df[df["status"] == "finished"]
    by_id = {c.cell_id: c for c in p.cells}
    by_unhealed = {c.unhealed_id: c for c in p.cells if c.owns_unhealed}
    out = []
    for spec in exp.models:
        model, w = spec.name, workload(exp, spec)
        arch, rates = p.models[model].arch, costs[model].rates
        rows = df[df["model"] == model]
        base = rows[rows["stage"] == "baseline"]
        if len(base):  # profile_s: every table and greedy order of stage 1, the load apart
            first = [x for need in stage1_work([c for c in p.cells if c.model == model])
                     for x in (cost.profile_work(arch, need.calibration) if need.kind == "table"
                               else cost.greedy_work(arch, need.calibration, need.rounds))]
            out.append((model, "profile", 1, sum(rates.seconds(x) for x in first), float(base["profile_s"].iloc[0])))
            ev = sum(rates.seconds(x) for x in cost.evaluation_work(arch, arch.layers, w.evaluation))
            out.append((model, "baseline", len(base), ev * len(base), float(base["wall_s"].sum())))
        sums: dict[str, list[float]] = {}

        def add(stage: str, predicted: float, measured: float, sums: dict[str, list[float]] = sums) -> None:
            hit = sums.setdefault(stage, [0, 0.0, 0.0])
            hit[0] += 1
            hit[1] += predicted
            hit[2] += measured

        for _, r in rows[rows["stage"] == "unhealed"].iterrows():
            cell = by_unhealed.get(r["cell_id"])
            if cell is not None:
                add("unhealed", _predicted(arch, w, cell, "unhealed", rates, exp), float(r["eval_s"]))
        for _, r in rows[rows["stage"] == "healed"].iterrows():
            cell = by_id.get(r["cell_id"])
            if cell is None:
                continue
            parts = {s: _predicted(arch, w, cell, s, rates, exp) for s in ("load", "heal", "healed")}
            add("load", parts["load"], float(r["load_s"]))
            add("heal", parts["heal"], float(r["heal_s"]))
            add("healed", parts["healed"], float(r["eval_s"]))
            owned = (_predicted(arch, w, cell, "unhealed", rates, exp)
                     if cell.owns_unhealed and exp.eval.unhealed else 0.0)
            add("trial", sum(parts.values()) + owned, float(r["wall_s"]))
            heal = cell.heal_config()
            add("tokens_seen", heal.steps * heal.sequences_per_step * heal.seq_len, float(r["tokens_seen"]))
        out += [(model, stage, n, pred, meas) for stage, (n, pred, meas) in sums.items()]
    return out, planned


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("storage", help="a finished sweep's storage root")
    ap.add_argument("experiment", help="the experiment file it ran")
    ap.add_argument("--force", action="store_true", help="probe again instead of reading the cached rates")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    t = time.perf_counter()
    rows, planned = compare(args.storage, args.experiment, args.force)
    print(f"## Cost plan against measured: {args.storage} ({args.experiment})\n")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{time.perf_counter() - t:.0f} s with the probe\n")
    print("| model | stage | rows | predicted s | measured s | predicted / measured |\n|---|---|---|---|---|---|")
    for model, stage, n, pred, meas in rows:
        unit = "" if stage != "tokens_seen" else " (tokens)"
        ratio = f"{pred / meas:.2f}" if meas else "-"
        print(f"| {model} | {stage}{unit} | {n} | {pred:,.1f} | {meas:,.1f} | {ratio} |")
    print()
    for c in planned.costs:
        for kind in sorted(c.rates.measured):
            print(f"- {c.model} {kind}: {c.rates.rates[kind]:.3g} {'parameters' if kind == 'load' else 'FLOP'}/s, "
                  f"{c.rates.sources[kind]}")
    for note in planned.notes:
        print(f"- note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
