"""Scaling: how profiling and sweep wall time grow with samples, sequence length and cells.

1. ``ray_prune.profile`` of a real model (default SmolLM2-135M) against the
   number of calibration samples at a fixed max length, and against the max
   length at a fixed number of samples (median of interleaved repeats).
2. ``ray_prune.sweep.run_sweep`` on local Ray against the number of cells: a
   random-init 6-layer Llama saved as an ordinary HF directory with SmolLM2's
   tokenizer, so that trials cost what Ray and our orchestration cost and little
   else. The cells differ only in their seed (no unhealed evaluation), so every
   cell does the same work: load, prune, 4 heal steps, one small evaluation.
   Ray starts once, then an untimed 1-cell sweep warms up; every sweep writes to
   fresh storage and so profiles the model and evaluates its baseline again.

For each axis it prints time, time per unit, the log-log slope (the fitted
exponent: 1 is linear, 2 quadratic) and an affine fit time = a + b x, and says
whether the growth is linear.

    python benchmarks/scaling.py --samples 8 16 32 64 --lengths 64 128 256 512 --cells 1 2 4 8
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time

import numpy as np
from pathlib import Path

from timing import device_tag, interleaved_medians, machine
from benchmark_paths import save_tiny_models, tiny_spec


def fit(xs, ys) -> dict[str, float]:
    """Log-log slope, and the least-squares line y = a + b x with its R^2."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope = float(np.polyfit(np.log(x), np.log(y), 1)[0])
    b, a = np.polyfit(x, y, 1)
    r2 = 1 - float(((y - (a + b * x)) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12))
    return {"slope": slope, "a": float(a), "b": float(b), "r2": r2}


def judgement(f: dict[str, float], unit: str) -> str:
    if f["slope"] > 1.15:
        return f"super-linear: time grows as {unit}^{f['slope']:.2f}"
    if f["slope"] >= 0.85:
        return f"linear (exponent {f['slope']:.2f})"
    if f["r2"] >= 0.95 and f["b"] > 0:
        return (f"linear plus a fixed cost: {f['a']:.1f} s + {f['b']:.2f} s per {unit} (R^2 {f['r2']:.3f}); "
                f"the fixed part makes the log-log slope {f['slope']:.2f}")
    return f"sub-linear (exponent {f['slope']:.2f}, affine fit R^2 {f['r2']:.2f})"


def table(title: str, xname: str, unit: str, rows: list[tuple], extra_head: str = "") -> None:
    """rows: (x, seconds, extra cell or None); ``unit`` names one step of x (the per-unit column, the fit)."""
    print(f"\n## {title}\n")
    print(f"| {xname} | seconds | seconds per {unit} |{extra_head}")
    print("|---|---|---|" + "---|" * extra_head.count("|"))
    for x, s, extra in rows:
        print(f"| {x} | {s:.2f} | {s / x:.4f} |" + (f" {extra} |" if extra is not None else ""))
    f = fit([r[0] for r in rows], [r[1] for r in rows])
    print(f"\nfitted exponent (log-log slope) {f['slope']:.2f}; affine fit {f['a']:.2f} s + {f['b']:.4f} s x {unit} "
          f"(R^2 {f['r2']:.3f}): **{judgement(f, unit)}**", flush=True)


def profiling_scaling(model_name: str, samples: list[int], lengths: list[int], fixed_len: int, fixed_samples: int,
                      batch_size: int, repeats: int) -> None:
    from ray_prune.core.data import load_texts
    from ray_prune.core.profile import profile
    from ray_prune.core.models import load_model

    model, tok = load_model(model_name)
    texts = load_texts("calibration", max(samples + [fixed_samples]))

    def padded_tokens(k, length):
        """Tokens the forward passes process: profile's batches (sorted by length) padded to their longest."""
        lengths = [min(len(ids), length) for ids in tok(texts[:k])["input_ids"]]
        order = sorted(range(k), key=lambda i: len(texts[i]))
        return sum(len(b) * max(lengths[i] for i in b)
                   for b in (order[j:j + batch_size] for j in range(0, k, batch_size)))

    def timed(points):
        fns = {p: (lambda k=p[0], m=p[1]: profile(model, tok, texts[:k], batch_size=batch_size, max_length=m,
                                                   progress=False)) for p in points}
        return interleaved_medians(fns, repeats, warmup=0)

    profile(model, tok, texts[:batch_size], batch_size=batch_size, max_length=min(lengths), progress=False)  # warm-up
    t = timed([(k, fixed_len) for k in samples])
    table(f"Profiling {model_name} vs calibration samples (max length {fixed_len}, batch {batch_size})",
          "samples", "sample", [(k, t[(k, fixed_len)], padded_tokens(k, fixed_len)) for k in samples],
          " tokens processed (batches padded to their longest) |")
    t = timed([(fixed_samples, m) for m in lengths])
    rows = [(m, t[(fixed_samples, m)], padded_tokens(fixed_samples, m)) for m in lengths]
    table(f"Profiling {model_name} vs max length ({fixed_samples} samples, batch {batch_size})", "max length",
          "token of max length", rows, " tokens processed (C4 documents shorter than the max are not padded up to "
          "it) |")
    f = fit([r[2] for r in rows], [r[1] for r in rows])
    print(f"\nagainst the tokens processed: exponent {f['slope']:.2f} (**{judgement(f, 'token')}**); the attention "
          "part of the cost grows with the square of the length, but up to these lengths the linear layers, "
          "which grow with the tokens, dominate.")
    del model


def sweep_spec(model_dir: str, cells: int, name: str) -> dict:
    """The tiny experiment (tests/tiny.yaml), one pruned model, ``cells`` seeds of it."""
    base = tiny_spec()
    return tiny_spec([model_dir], name, fractions=[0.5], strategies=["deepest"], seeds=list(range(cells)),
                     eval={**base["eval"], "unhealed": False},
                     resources={**base["resources"], "max_failures": 0})


def sweep_scaling(cells: list[int]) -> None:
    import ray

    from ray_prune.sweep.experiment import parse_experiment
    from ray_prune.sweep.run import run_sweep

    work = tempfile.mkdtemp(prefix="ray-prune-scaling-")
    try:
        model_dir = str(save_tiny_models(Path(work), ["tiny-llama"]) / "tiny-llama")
        cpus = os.cpu_count() or 1
        t = time.perf_counter()
        # address="local": a fresh instance of our own, never one that another job on this machine started
        ray.init(address="local", num_cpus=cpus, num_gpus=0, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t
        # Untimed warm-up sweep: first-time costs (OS file cache, compiled regexes, Tune's first experiment) are
        # not the cost of a cell.
        run_sweep(parse_experiment(sweep_spec(model_dir, 1, "scaling-warmup")), storage=os.path.join(work, "warm"),
                  progress=False)
        rows = []
        for k in cells:
            exp = parse_experiment(sweep_spec(model_dir, k, f"scaling-{k}"))
            t = time.perf_counter()
            df = run_sweep(exp, storage=os.path.join(work, f"store-{k}"), progress=False)
            wall = time.perf_counter() - t
            healed = df[(df["stage"] == "healed") & (df["status"] == "finished")]
            if len(healed) != k:
                raise RuntimeError(f"sweep of {k} cells finished {len(healed)}")
            work_s = healed["wall_s"].sum()
            rows.append((k, wall, f"{work_s:.1f} | {math.ceil(k / cpus)}"))
        table(f"Sweep wall time vs cells (tiny random-init Llama, {cpus} trials at a time, 1 CPU each; "
              f"Ray started once before, in {ray_start:.1f} s)", "cells", "cell", rows,
              " sum of trials' own wall_s (load to last eval) | rounds of concurrent trials |")
        f = fit([math.ceil(k / cpus) for k in cells], [r[1] for r in rows]) if len(set(math.ceil(k / cpus)
                                                                                      for k in cells)) > 1 else None
        if f is not None:
            print(f"\nagainst rounds of {cpus} concurrent trials: {f['a']:.1f} s + {f['b']:.1f} s per round "
                  f"(R^2 {f['r2']:.3f})")
        print(f"\nEach sweep also profiles the model and evaluates its baseline in a Ray actor before its trials, "
              f"and starts a Tune controller: that is the fixed part. With {cpus} trial slots time grows in rounds "
              f"of {cpus} cells. A worker process serves trial after trial (its start-up and imports are paid once per "
              "slot); for this tiny model the model load, Tune's scheduling and the row writes still outweigh its 4 "
              "heal steps, so the time per cell is mostly fixed cost per trial.")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", nargs="+", type=int, default=[8, 16, 32, 64])
    ap.add_argument("--lengths", nargs="+", type=int, default=[64, 128, 256, 512])
    ap.add_argument("--fixed-length", type=int, default=64, help="max length of the samples axis")
    ap.add_argument("--fixed-samples", type=int, default=8, help="samples of the length axis")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cells", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-profile", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true")
    args = ap.parse_args()

    print(f"# Scaling ({device_tag()})\n\n{machine()}; profiling times are medians of {args.repeats} interleaved "
          "repeats, sweep times one run each")
    if not args.skip_profile:
        profiling_scaling(args.model, sorted(args.samples), sorted(args.lengths), args.fixed_length,
                          args.fixed_samples, args.batch_size, args.repeats)
    if not args.skip_sweep:
        sweep_scaling(sorted(args.cells))


if __name__ == "__main__":
    main()
