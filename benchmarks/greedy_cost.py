"""Greedy (SLEB) removal order: its cost as a multiple of one profile pass, against the naive loop.

For each model, on one calibration set (``--blocks`` packed C4 calibration blocks of ``--seq-len`` tokens; the
profile reads the same blocks, decoded to text and cut at ``--seq-len`` tokens), prints the time of
- ``profile``: ``ray_prune.core.profile.profile`` (angular, one pass), the unit;
- ``greedy``: ``ray_prune.core.greedy.greedy_order`` over its first ``--naive-rounds`` rounds, which caches the
  stream entering each block per round and runs a candidate only from the block it removes;
- ``naive``: the same first ``--naive-rounds`` rounds the obvious way: every candidate pruned with
  ``prune_layers`` and its loss taken in full with ``loss.next_token_loss``. Making the pruned copies is left out
  of its time (it is not inherent), so naive / greedy is the least the cache saves. Profile, greedy and naive are
  interleaved (``--repeats`` rounds of each), and both ways must choose the same layers with the same losses;
- ``greedy, r rounds``: ``greedy_order(max_remove=r)``, r the layers ``--fraction`` removes (what a sweep up
  to that fraction needs), one run (minutes), against the mean of a
  profile pass just before and just after it (the load of a shared machine drifts over minutes);
- ``greedy, full order``: all L - 1 rounds, every size (with ``--full``).

    python benchmarks/greedy_cost.py --models smollm2-135m gemma3-270m --blocks 2 --seq-len 64 --fraction 0.25
"""

from __future__ import annotations

import argparse
import gc
import time

from timing import device_tag, interleaved_medians, machine, median_seconds


def naive_order(model, blocks, bos, rounds: int, batch_size: int) -> tuple[list[int], list[float], float]:
    """(order, losses, seconds of the loss passes): every round, every candidate pruned and run whole."""
    from ray_prune.core.loss import next_token_loss
    from ray_prune.core.prune import prune_layers

    L = model.config.num_hidden_layers
    removed: list[int] = []
    losses: list[float] = []
    seconds = 0.0
    for _ in range(rounds):
        cand = {}
        for j in range(L):
            if j in removed:
                continue
            pruned = prune_layers(model, sorted(removed + [j]), inplace=False)
            t = time.perf_counter()
            cand[j] = next_token_loss(pruned, blocks, batch_size=batch_size, bos=bos)
            seconds += time.perf_counter() - t
            del pruned
        best = min(cand, key=lambda j: (cand[j], j))
        removed.append(best)
        losses.append(cand[best])
    return removed, losses, seconds


def measure(name: str, texts: list[str], args) -> tuple[str, str | None]:
    """One model's table row, and its note on the full order (None without ``--full``)."""
    from ray_prune.core.greedy import greedy_order
    from ray_prune.core.models import load_model
    from ray_prune.core.packing import pack_texts, scored_bos
    from ray_prune.core.profile import profile
    from ray_prune.core.select import n_from_fraction

    model, tok = load_model(name, dtype="fp32")
    L = model.config.num_hidden_layers
    blocks = pack_texts(texts, tok, args.seq_len, max_blocks=args.blocks)
    if blocks.shape[0] < args.blocks:
        raise SystemExit(f"only {blocks.shape[0]} blocks of calibration text")
    bos = scored_bos(tok)
    docs = tok.batch_decode(blocks, skip_special_tokens=True)
    rounds = n_from_fraction(args.fraction, L)
    k = min(args.naive_rounds, rounds)
    kept = {}

    def run_profile():
        kept["table"] = profile(model, tok, docs, batch_size=args.batch_size, max_length=args.seq_len, progress=False)

    def run_greedy() -> float:
        kept["greedy"] = greedy_order(model, blocks, bos=bos, batch_size=args.batch_size, max_remove=k)
        return kept["greedy"].seconds

    def run_naive() -> float:
        *kept["naive"], seconds = naive_order(model, blocks, bos, k, args.batch_size)
        return seconds

    run_profile()  # warm-up, untimed: the greedy and naive runs are too long to repeat for one
    t = interleaved_medians({"profile": run_profile, "greedy": run_greedy, "naive": run_naive}, args.repeats, warmup=0)
    (order, losses), fast = kept["naive"], kept["greedy"]
    cands = sum(L - j for j in range(k))
    same = "yes" if order == fast.order else f"NO ({order} vs {fast.order})"
    diff = max(abs(a - b) for a, b in zip(losses, fast.losses))
    # The sweep's r rounds: one run, between two profile passes (the load on a shared machine drifts).
    before = median_seconds(run_profile, 1, warmup=0)
    long = greedy_order(model, blocks, bos=bos, batch_size=args.batch_size, max_remove=rounds)
    unit = (before + median_seconds(run_profile, 1, warmup=0)) / 2
    full_cells, note = "not run | -", None
    if args.full:
        full = greedy_order(model, blocks, bos=bos, batch_size=args.batch_size)
        unit_full = (unit + median_seconds(run_profile, 1, warmup=0)) / 2
        full_cells = f"{full.seconds:.0f} | **{full.seconds / unit_full:.0f}x**"
        note = (f"- {name}: full order {full.order}; calibration loss {full.base_loss:.3f} unpruned, "
                + ", ".join(f"{loss:.3f} after {n}" for n, loss in enumerate(full.losses, 1)
                            if n in (rounds, L // 2, L - 1)))
    row = (f"| {name} | {L} | {fast.tokens} / {kept['table'].tokens} | {t['profile']:.2f} | {t['greedy']:.1f} | "
           f"{t['naive']:.1f} | **{t['naive'] / t['greedy']:.2f}x** | {t['greedy'] / cands / t['profile']:.2f} / "
           f"{t['naive'] / cands / t['profile']:.2f} | {same}, {diff:.1e} | {rounds} | {long.seconds:.0f} | "
           f"**{long.seconds / unit:.0f}x** | {full_cells} |")
    return row, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--naive-rounds", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="also time the full order (L - 1 rounds)")
    args = ap.parse_args()

    from ray_prune.core.data import load_texts

    texts = load_texts("calibration", 8 * args.blocks + 16)
    print(f"# Greedy order cost ({device_tag()})\n\n{machine()}; fp32; {args.blocks} packed C4 calibration blocks of "
          f"{args.seq_len} tokens, batch {args.batch_size}. Greedy and naive over the first {args.naive_rounds} "
          f"round(s), interleaved with the profile pass, median of {args.repeats}; then the greedy's first r rounds, "
          f"the layers {args.fraction:.0%} removes (what a sweep up to that fraction needs), one run, against the mean "
          "of a profile pass just before and just after\n")
    print(f"| model | L | tokens (greedy / profile) | profile s | greedy, {args.naive_rounds} round(s) s | naive, same "
          "s | **naive / greedy** | per candidate, greedy / naive (profile passes) | same order, max loss diff | r | "
          "greedy, r rounds s | **greedy r rounds / profile** | greedy full order s | **full order / profile** |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for name in args.models:
        row, note = measure(name, texts, args)
        print(row, flush=True)
        if note:
            notes.append(note)
        gc.collect()
    print("\nA round of K candidates costs the cached way one pass of the current model, K(K-1)/2 block calls and K "
          "LM heads, the naive way K(K-1) block calls and K heads (and K embeddings and copies): the saving is "
          "at most 2x in the blocks and none in the heads, so it is smaller where the LM head is a large part of "
          "a pass (Gemma-3-270M: 168M of its 268M parameters). The profile pass runs no head at all.")
    if notes:
        print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
