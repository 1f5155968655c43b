"""Run every benchmark and write benchmarks/RESULTS.md (figures, machine, exact commands)."""

from __future__ import annotations

import datetime
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
COMMANDS = [
    ["profile_cost.py", "--samples", "16", "--max-length", "256"],
    ["pruned_inference.py"],
    ["heal_throughput.py", "--steps", "6", "--batch", "2", "--seq-len", "128"],
    ["sweep_overhead.py", str(HERE.parent / "experiments" / "smoke.yaml")],
]


def main() -> None:
    parts = [f"# Benchmark results\n\nWritten by `make bench` on {datetime.date.today()}. Each table comes from "
             "one run on one machine; ratios compare runs made in the same process, alternating where noted.\n"]
    for cmd in COMMANDS:
        line = " ".join(["python", "benchmarks/" + cmd[0], *cmd[1:]])
        print(f"$ {line}", flush=True)
        out = subprocess.run([sys.executable, *cmd], cwd=HERE, capture_output=True, text=True)
        text = out.stdout if out.returncode == 0 else out.stdout + "\nFAILED:\n" + out.stderr[-3000:]
        print(text, flush=True)
        parts.append(f"## `{line}`\n\n{text}\n")
    (HERE / "RESULTS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
