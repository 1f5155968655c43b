"""The cost plan as a table: a row per model and stage, totals, and the rates with where each comes from."""

from __future__ import annotations

from collections.abc import Sequence

from ray_prune.core.cost.plan import ModelCost
from ray_prune.core.cost.work import KINDS


def _si(value: float, unit: str = "") -> str:
    """``131k``; with a unit, ``98.1 TFLOP/s``."""
    space = " " if unit else ""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{space}{prefix}{unit}"
    return f"{value:.3g}{space}{unit}"


def _hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def format_cost_table(costs: Sequence[ModelCost], price_per_gpu_hour: float | None = None) -> str:
    """One row per model and stage: runs, tokens, FLOPs, GPUs, device-hours and whether its rates are measured or
    defaults; a total per model and for the sweep, priced when a price per GPU-hour is given; then the rates."""
    rows = [("model", "stage", "runs", "tokens", "FLOPs", "GPUs", "device-h", "rates")]
    for c in costs:
        for s in c.stages:
            rows.append((c.model, s.stage, str(s.runs), _si(s.tokens) if s.tokens else "-",
                         _si(s.flops) if s.flops else "-", str(s.gpus), _hours(s.device_hours(c.rates)),
                         c.rates.source(s.kinds)))
        rows.append((c.model, "total", str(c.cells) + " cells", "", "", "", _hours(c.device_hours), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(widths[i]) if i in (0, 1, 7) else v.rjust(widths[i]) for i, v in enumerate(r))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(c.device_hours for c in costs)
    devices = sorted({c.rates.device for c in costs})
    line = f"sweep total: {_hours(total)} device-hours on {', '.join(devices)}"
    if price_per_gpu_hour is not None:
        line += f", {price_per_gpu_hour * total:,.0f} at {price_per_gpu_hour:g} per GPU-hour"
    lines.append(line)
    seen: set[tuple] = set()
    for c in costs:
        key = (c.rates.device, tuple(sorted(c.rates.rates.items())))
        if key in seen:
            continue
        seen.add(key)
        who = f" ({c.model})" if c.rates.measured else ""
        lines.append(f"rates on {c.rates.device}{who}: " + ", ".join(
            f"{k} {_si(c.rates.rates[k]) + ' parameters/s' if k == 'load' else _si(c.rates.rates[k], 'FLOP/s')}"
            for k in KINDS
            if k in c.rates.rates))
        by_source: dict[str, list[str]] = {}
        for k in KINDS:
            if k in c.rates.sources:
                by_source.setdefault(c.rates.sources[k], []).append(k)
        lines += [f"  {', '.join(kinds)}: {source}" for source, kinds in by_source.items()]
    return "\n".join(lines)
