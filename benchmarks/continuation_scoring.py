"""Continuation scoring: time per question of lm-eval's HF path, one row per request, and shared contexts and prefixes.

For each bundled model and task, lm-eval builds the requests of the first
``--questions`` questions from the local mirror and tokenizes them (MMLU 5-shot:
the first questions of each of ``--subjects`` subjects, as a run over whole
subjects sees them; and ``--sampled`` subjects with one question each, as a
``limit``-sampled run mostly sees them). The same requests are then scored by
- lm-eval's own ``HFLM._loglikelihood_tokens``: one row per request (one per
  context for one-token answers), logits at every position;
- one row per request as ``score_continuations`` did before contexts were
  shared (``_score_full_rows``: the same rows, the LM head only where a token is
  scored);
- ``score_continuations`` with each context run once for all its choices, but
  no prefix shared across questions (``min_shared_prefix=None``);
- ``score_continuations`` as the harness runs it, few-shot prefixes shared too;
in one process, 1 torch thread (``--threads``), repeats interleaved, the same
batch size for all. It prints the median time per question of each, the ratios
of the old paths to the new one (target: faster than one row per request
where the new path runs ``FEWER`` times fewer tokens, else no slower than
``NO_SLOWER``),
the tokens each path runs through the decoder per question (padding
included, counted at the embedding), and the largest difference of any score
from ``_score_full_rows`` with the number of greedy flags that differ.

    python benchmarks/continuation_scoring.py --models smollm2-135m gemma3-270m --questions 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import benchmark_paths  # noqa: F401  (tests/ on the path)
import torch
from timing import device_tag, interleaved_medians, machine, verdict

# The request builders live with the scorer's tests, which check them against lm-eval.
sys.path.insert(0, str(benchmark_paths.TESTS / "core" / "evaluation"))
from test_loglikelihood import lm_eval_instances, lm_eval_requests  # noqa: E402

FEWER = 1.1  # where the shared path runs this many times fewer tokens than one row per request,
TARGET = 1.0  # it must be faster;
NO_SLOWER = 0.9  # elsewhere no slower, to within padding and the noise of a shared machine
TASKS = {"arc_easy": 0, "piqa": 0, "hellaswag": 0, "boolq": 0, "winogrande": 0, "mmlu": 5}
ORDER = ["arc_easy", "piqa", "hellaswag", "boolq", "winogrande", "mmlu", "mmlu_sampled"]


def task_instances(tasks: list[str], questions: int, subjects: int, sampled: int, data_dir: Path) -> dict[str, list]:
    """lm-eval's instances per row of the table: each task, MMLU whole subjects, MMLU one question per subject."""
    from ray_prune.core.evaluation.tasks import MMLU_SUBJECTS

    whole = MMLU_SUBJECTS[:subjects]
    spread = MMLU_SUBJECTS[subjects:subjects + sampled]
    built = lm_eval_instances({t: TASKS[t] for t in tasks}, questions, data_dir, whole)
    out = {name: built[f"rp_{name}"] for name in tasks if name != "mmlu"}
    if "mmlu" in tasks:
        out["mmlu"] = [i for s in whole for i in built[f"rp_mmlu_{s}"]]
        if sampled:
            one = lm_eval_instances({"mmlu": 5}, 1, data_dir, spread)
            out["mmlu_sampled"] = [i for s in spread for i in one[f"rp_mmlu_{s}"]]
    return out


NAMES = {"arc_easy": "ARC-Easy", "piqa": "PIQA", "hellaswag": "HellaSwag", "boolq": "BoolQ", "winogrande": "WinoGrande"}


def label(task: str, questions: int, subjects: int, sampled: int) -> str:
    if task == "mmlu":
        return f"MMLU 5-shot, {questions} q x {subjects} subjects"
    if task == "mmlu_sampled":
        return f"MMLU 5-shot, 1 q x {sampled} subjects"
    return f"{NAMES[task]} 0-shot"


def timed(key: str, fn, tokens: dict, scores: dict, counted: dict, walls: dict):
    """``fn`` as ``interleaved_medians`` times it: it returns its CPU seconds, and records its scores, the tokens
    it ran through the decoder and its wall-clock seconds."""
    def call() -> float:
        tokens["n"] = 0
        wall, cpu = time.perf_counter(), time.process_time()
        scores[key] = fn()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        counted[key] = tokens["n"]
        walls[key].append(wall)
        return cpu
    return call


@torch.inference_mode()
def run_model(name: str, instances: dict[str, list], args) -> list[dict]:
    from lm_eval.models.huggingface import HFLM

    from ray_prune.core.evaluation.loglikelihood import _score_full_rows, score_continuations
    from ray_prune.core.models import load_model

    model, tok = load_model(name, dtype="fp32")
    device = torch.device("cpu")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size, max_length=args.max_length)
    tokens = {"n": 0}
    hook = model.get_input_embeddings().register_forward_hook(
        lambda m, a, o: tokens.__setitem__("n", tokens["n"] + a[0].numel()))
    rows = []
    try:
        for task in (t for t in ORDER if t in instances):
            requests = lm_eval_requests(model, tok, instances[task])
            questions = len({inst.doc_id for inst in instances[task]} if task not in ("mmlu", "mmlu_sampled")
                            else {(inst.task_name, inst.doc_id) for inst in instances[task]})
            paths = {
                "lm-eval": lambda r=requests: lm._loglikelihood_tokens(r, disable_tqdm=True),
                "full rows": lambda r=requests: _score_full_rows(model, r, args.max_length, args.batch_size, device),
                "contexts": lambda r=requests: score_continuations(model, r, args.max_length, args.batch_size,
                                                                   device, min_shared_prefix=None),
                "shared": lambda r=requests: score_continuations(model, r, args.max_length, args.batch_size, device),
            }
            scores: dict = {}
            counted: dict = {}
            walls: dict = {k: [] for k in paths}
            seconds = interleaved_medians({k: timed(k, fn, tokens, scores, counted, walls) for k, fn in paths.items()},
                                          args.repeats, args.warmup)
            wall = {k: statistics.median(v[args.warmup:]) for k, v in walls.items()}
            reference = scores["full rows"]
            diffs = {k: (max(abs(a - b) for (a, _), (b, _) in zip(v, reference)),
                         sum(ga != gb for (_, ga), (_, gb) in zip(v, reference))) for k, v in scores.items()}
            rows.append({"model": name, "task": task, "questions": questions, "requests": len(requests),
                         "contexts": len({tuple(c) for _, c, _ in requests}),
                         "s": {k: v / questions for k, v in seconds.items()},
                         "wall": {k: v / questions for k, v in wall.items()},
                         "tokens": {k: v / questions for k, v in counted.items()}, "diffs": diffs})
            print(f"  {name} {task}: " + ", ".join(f"{k} {v / questions:.3f} s/q" for k, v in seconds.items()),
                  file=sys.stderr, flush=True)
    finally:
        hook.remove()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--questions", type=int, default=4, help="questions per task (MMLU: per subject)")
    ap.add_argument("--subjects", type=int, default=2, help="MMLU subjects run with --questions questions each")
    ap.add_argument("--sampled", type=int, default=4, help="further MMLU subjects run with one question each")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ray_prune.core.data import data_dir

    root = data_dir(None)
    if root is None:
        sys.exit("set RAY_PRUNE_DATA_DIR to the local data mirror")
    instances = task_instances(args.tasks, args.questions, args.subjects, args.sampled, Path(root))
    rows = [row for name in args.models for row in run_model(name, instances, args)]

    print(f"# Continuation scoring ({device_tag()})\n\n{machine()}; fp32, batch size {args.batch_size}, max length "
          f"{args.max_length}; lm-eval's requests, built and tokenized by lm-eval from the local mirror; CPU seconds "
          f"of this process (one thread: its work, not its waits on a shared machine), median of {args.repeats} "
          f"interleaved repeats after {args.warmup} warm-up\n")
    print("| model | task | questions (requests, contexts) | tokens per question: lm-eval, one row per request, "
          "contexts shared, contexts and prefixes shared | s per question: lm-eval | one row per request | contexts "
          "shared | **contexts and prefixes shared** | **one row / shared** | **lm-eval / shared** | wall clock: one "
          "row / shared, lm-eval / shared | max abs score diff vs one row (greedy flags differing) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, t, w = r["s"], r["tokens"], r["wall"]
        worst = max(r["diffs"][k][0] for k in ("contexts", "shared"))
        flips = max(r["diffs"][k][1] for k in ("contexts", "shared"))
        print(f"| {r['model']} | {label(r['task'], args.questions, args.subjects, args.sampled)} | {r['questions']} "
              f"({r['requests']}, {r['contexts']}) | {t['lm-eval']:.0f}, {t['full rows']:.0f}, {t['contexts']:.0f}, "
              f"{t['shared']:.0f} | {s['lm-eval']:.3f} | {s['full rows']:.3f} | {s['contexts']:.3f} | "
              f"**{s['shared']:.3f}** | **{s['full rows'] / s['shared']:.2f}x** | "
              f"**{s['lm-eval'] / s['shared']:.2f}x** | {w['full rows'] / w['shared']:.2f}x, "
              f"{w['lm-eval'] / w['shared']:.2f}x | {worst:.1e} ({flips}) |")
    print()
    for r in rows:
        ratio = r["s"]["full rows"] / r["s"]["shared"]
        fewer = r["tokens"]["full rows"] / r["tokens"]["shared"]
        target = TARGET if fewer >= FEWER else NO_SLOWER
        print(f"- {r['model']}, {label(r['task'], args.questions, args.subjects, args.sampled)}: one row per request "
              f"/ shared = {ratio:.2f}x for {fewer:.2f}x fewer tokens, target >= {target:.2f}x: "
              f"**{verdict(ratio, target, at_least=True)}**")
    prefix = [f"{r['model']} {label(r['task'], args.questions, args.subjects, args.sampled)} "
              f"{r['s']['contexts'] / r['s']['shared']:.2f}x" for r in rows
              if r["tokens"]["shared"] < r["tokens"]["contexts"]]
    print("\nWhat sharing prefixes across questions adds where it saves tokens (contexts shared / contexts and "
          "prefixes shared): " + (", ".join(prefix) or "nowhere") + ".")
    print("\nThe time falls less than the tokens do because every forward pass reads all the weights (and, where "
          "any position is scored, the whole LM head) whatever its batch: on one CPU thread a small batch costs "
          "several dozen tokens' worth for these models. The shared path runs about as many forward passes as one "
          "row per request once batches are full (a context's batch, then its other continuations' batches), but "
          "with a few questions the last, part-filled batches weigh, and a shared prefix is a pass of its own. "
          "PIQA saves little: its context is short next to its two solutions. BoolQ (' no'/' yes') and MMLU's "
          "letters already shared one row per context. lm-eval's own path also computes the full vocabulary's "
          "logits at every position, which for Gemma-3's 262k-token head is most of its time.")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
