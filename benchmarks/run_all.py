"""Run every benchmark and write benchmarks/RESULTS.md: the figures, the machine, the exact commands.

Each command runs from the repository root, exactly as printed. RESULTS.md
holds one section per device (CPU, GPU): a run replaces the section of the
device it ran on and keeps the other, so CPU and GPU figures sit side by side,
each marked by device.

    make bench          # or: cd benchmarks && python run_all.py [--only profile_cost.py ...]

With ``--only``, the commands not run keep their earlier subsections (each dated by its own run).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import device_tag, machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Sized for about 25 minutes in all on 2 CPU cores, most of it the smoke sweep (see each script's docstring for
# what it measures; each prints its ratio, its target and whether it is met).
COMMANDS = [
    ["benchmarks/profile_cost.py", "--samples", "8", "--max-length", "128", "--repeats", "3", "--per-n-passes", "3"],
    ["benchmarks/streamed_profile.py", "--samples", "16", "--max-length", "256", "--batch-size", "8", "--repeats", "2"],
    ["benchmarks/pruned_inference.py", "--batch", "2", "--seq-len", "128", "--prompt", "32", "--new-tokens", "16",
     "--repeats", "3"],
    ["benchmarks/heal_throughput.py", "--steps", "6", "--batch", "2", "--seq-len", "128", "--repeats", "3"],
    ["benchmarks/continuation_scoring.py", "--questions", "4", "--subjects", "1", "--sampled", "2", "--repeats", "3",
     "--warmup", "0"],
    ["benchmarks/scaling.py", "--samples", "8", "16", "32", "64", "--fixed-length", "64", "--lengths", "64", "128",
     "256", "512", "--fixed-samples", "8", "--cells", "1", "2", "4", "8", "--repeats", "2"],
    ["benchmarks/sweep_overhead.py", "experiments/smoke.yaml"],
    ["benchmarks/greedy_cost.py", "--blocks", "2", "--seq-len", "64", "--fraction", "0.25"],
    ["benchmarks/repair_cost.py", "--blocks", "16", "48", "--seq-len", "256"],
    # the cost plan against the stage timings of the methods study, run on this machine (docs/study/methods/)
    ["benchmarks/cost_vs_measured.py", "docs/study/methods/run", "experiments/methods.yaml"],
]
ENV_KEYS = ("OMP_WAIT_POLICY", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE")


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ray_prune", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(cmd: list[str]) -> tuple[str, float, int]:
    """Run one benchmark from the repository root, echoing its stdout; return (stdout, seconds, exit code)."""
    t = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        code = proc.wait()
        err.seek(0)
        text = "".join(lines)
        if code:
            text += f"\n**FAILED** (exit {code}); end of stderr:\n\n```\n{err.read()[-3000:]}\n```\n"
    return text, time.perf_counter() - t, code


def merge(old: str, device: str, section: str) -> str:
    """RESULTS.md with this device's section replaced (or added), other devices' sections kept."""
    begin, end = f"<!-- begin {device} -->", f"<!-- end {device} -->"
    block = f"{begin}\n{section.strip()}\n{end}"
    sections = re.findall(r"<!-- begin (\w+) -->.*?<!-- end \1 -->", old, flags=re.S)
    kept = {d: re.search(rf"<!-- begin {d} -->.*?<!-- end {d} -->", old, flags=re.S).group(0)
            for d in sections if d != device}
    kept[device] = block
    head = ("# Benchmark results\n\nWritten by `make bench` (benchmarks/run_all.py), one section per device. "
            "Every ratio compares runs made in one process on one machine; timings of things compared are "
            "interleaved. Absolute times depend on the machine and its load; the ratios are the figures.\n")
    return head + "\n" + "\n\n".join(kept[d] for d in sorted(kept)) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", help="script names to run (default: all)")
    args = ap.parse_args()
    commands = [c for c in COMMANDS if not args.only or Path(c[0]).name in args.only]

    device = device_tag()
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    env = ", ".join(f"{k}={os.environ[k]}" for k in ENV_KEYS if k in os.environ)
    path = HERE / "RESULTS.md"
    old = path.read_text() if path.exists() else ""
    earlier = earlier_parts(old, device) if args.only else {}
    parts, timings = {}, []
    for cmd in commands:
        line = " ".join(["python", *cmd])
        print(f"$ {line}", flush=True)
        text, seconds, code = run(cmd)
        timings.append((line, seconds, code))
        parts[line] = f"### `{line}`\n\n_{seconds / 60:.1f} min, run {started}_\n\n{_demote(text.strip())}\n"
    total = sum(s for _, s, _ in timings)
    order = [" ".join(["python", *c]) for c in COMMANDS]
    order += [line for line in earlier if line not in order]  # one-off runs added by hand stay, after the rest
    kept = [line for line in order if line not in parts and line in earlier]
    header = (f"## {device}\n\n- machine: {machine()}\n- python {sys.version.split()[0]}, ray-prune at git "
              f"{git_revision()}\n- run: {started}, `make bench`{' --only' if args.only else ''}, "
              f"{total / 60:.1f} min in all\n"
              f"- environment: {env or 'defaults'}\n- commands, from the repository root (`python` is the interpreter "
              "that ran run_all.py: the project's venv under `make bench`), each with its run time:\n"
              + "".join(f"  - `{line}` ({s / 60:.1f} min{', FAILED' if c else ''})\n" for line, s, c in timings)
              + ("- kept from earlier runs (their ratios are of those runs; newer subsections carry their run date):\n"
                 + "".join(f"  - `{line}`\n" for line in kept) if kept else ""))
    body = [parts.get(line) or earlier[line] for line in order if line in parts or line in earlier]
    section = header + "\n" + "\n".join(body)
    path.write_text(merge(old, device, section))
    print(f"wrote {path.relative_to(ROOT)} ({device} section), {total / 60:.1f} min in all", flush=True)


def earlier_parts(old: str, device: str) -> dict[str, str]:
    """``{command line: its subsection}`` of this device's section in RESULTS.md, so that ``--only`` replaces the
    commands it runs and keeps the figures of the others (each subsection carries its own run date)."""
    block = re.search(rf"<!-- begin {device} -->(.*?)<!-- end {device} -->", old, flags=re.S)
    if not block:
        return {}
    pieces = re.split(r"^(?=### `python )", block.group(1), flags=re.M)[1:]
    out = {}
    for piece in pieces:
        line = re.match(r"### `(python [^`]*)`", piece).group(1)
        out[line] = piece.rstrip() + "\n"
    return out


def _demote(text: str) -> str:
    """Headings printed by a script sit below this file's '### command' level."""
    return re.sub(r"^(#{1,3}) ", lambda m: "#" * (len(m.group(1)) + 3) + " ", text, flags=re.M)


if __name__ == "__main__":
    main()
