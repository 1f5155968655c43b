"""``ray-prune sweep | report | status``: an experiment on Ray, and what its storage holds."""

from __future__ import annotations


def cmd_sweep(args) -> int:
    from ray_prune.sweep.experiment import load_experiment

    exp = load_experiment(args.experiment, args.max_cells)
    if args.check:
        return _check(exp, args)
    from ray_prune.cli import exit_now
    from ray_prune.report.status import summary_table
    from ray_prune.sweep.interrupt import SweepInterrupted
    from ray_prune.sweep.run import run_sweep

    try:
        df = run_sweep(exp, storage=args.storage, rerun=args.rerun, progress=not args.quiet,
                       exit_on_interrupt=lambda e: exit_now(args.command, e))
    except SweepInterrupted as e:  # stage 1 or between stages: the lock is released already; Ray goes with us
        exit_now(args.command, e)
    print(summary_table(df))
    # Non-zero when a cell failed for good, so `ray job submit` and scripts see it; rerunning retries those cells.
    return 1 if (df["status"] == "failed").any() else 0


def _check(exp, args) -> int:
    """``sweep --check``: everything validated; the grid, the memory plan and the cost plan printed; nothing run.
    A stage that fits no GPU is refused after the plans are printed, so the refusal shows what was tried."""
    from ray_prune.core.cost import GPU_TYPES, format_cost_table
    from ray_prune.core.memory import format_plan_table
    from ray_prune.errors import UserError
    from ray_prune.sweep.cost_plan import gpu_type, plan_costs
    from ray_prune.sweep.plan import plan, plan_memory

    gpu = gpu_type(exp, args.gpu_type, args.gpu_memory_gb)
    memory_gb = args.gpu_memory_gb or (GPU_TYPES[args.gpu_type].memory_gib if args.gpu_type else None) or \
        exp.resources.gpu_memory_gb
    # the plan without its memory plan, which is made below so that a refusal still prints it
    bare = exp.model_copy(update={"resources": exp.resources.model_copy(update={"gpu_memory_gb": None})})
    p = plan(bare, args.storage, args.rerun, check=True, gpu_memory_gb=None)
    p.experiment = exp
    refused = None
    try:
        plan_memory(p, memory_gb)
    except UserError as e:
        refused = e
    where = p.storage.uri if p.storage is not None else (args.storage or exp.storage)
    print(f"{exp.name}: {len(p.cells)} cells ({len(p.pending)} to run) over "
          f"{', '.join(f'{m} (L={L})' for m, L in p.layers.items())} -> {where}")
    for line in p.summary():
        print(line)
    if p.storage_note:
        print(p.storage_note)
    if p.memory:
        sources = {m.model: m.config_source for m in p.memory}
        print(format_plan_table(p.memory))
        print("configs: " + ", ".join(f"{m} ({s})" for m, s in sources.items()))
    else:
        print("no memory plan: set resources.gpu_memory_gb (or pass --gpu-memory-gb or --gpu-type) for GPU trials")
    costs = plan_costs(p, gpu, probe=args.probe)
    measured = [bool(c.rates.measured) for c in costs.costs]
    rates = ("rates measured here" if all(measured) else f"default rates of one {gpu}" if not any(measured)
             else f"rates measured here, the default rates of one {gpu} where a probe failed")
    print(f"cost plan ({rates}; every cell a trial):")
    print(format_cost_table(costs.costs, args.price_per_gpu_hour))
    for note in costs.notes:
        print(f"note: {note}")
    if refused is not None:
        raise refused
    return 0


def cmd_report(args) -> int:
    from ray_prune.report.write import write_report

    index = write_report(args.storage, args.out)
    print(f"report -> {index}")
    return 0


def cmd_status(args) -> int:
    from ray_prune.report.status import status_report

    print(status_report(args.storage))
    return 0


