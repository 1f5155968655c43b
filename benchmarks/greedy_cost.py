"""Greedy (SLEB) removal order: its cost as a multiple of one profile pass, against the naive loop.

For each model, on one calibration set (``--blocks`` packed C4 calibration blocks of ``--seq-len`` tokens; the
profile reads the same blocks, decoded to text and cut at ``--seq-len`` tokens), prints the time of
- ``profile``: ``ray_prune.core.profile.profile`` (angular, one pass; median of ``--repeats``);
- ``greedy, r rounds``: ``ray_prune.core.greedy.greedy_order(max_remove=r)``, r the layers ``--fraction`` removes
  (a sweep up to that fraction needs no more), which caches the stream entering each block per round and runs a
  candidate only from the block it removes;
- ``naive``: the first ``--naive-rounds`` rounds the obvious way: every candidate pruned with ``prune_layers`` and
  its loss taken in full with ``loss.next_token_loss``. Making the pruned copies is left out of its time (it is
  not inherent), so the ratio to the greedy's same rounds (its own per-round times) is the least the cache saves;
- ``greedy, full order``: all L - 1 rounds, every size (with ``--full``);
then each as a multiple of the profile pass, naive / greedy over the same rounds, and checks that both ways chose
the same layers with the same losses. Each greedy and naive figure is one run (they take minutes), one after the
other.

    python benchmarks/greedy_cost.py --models smollm2-135m gemma3-270m --blocks 2 --seq-len 64 --fraction 0.25 \
        --naive-rounds 2
"""

from __future__ import annotations

import argparse
import gc
import time

from timing import device_tag, machine, median_seconds


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
    kept = {}

    def run_profile():
        kept["table"] = profile(model, tok, docs, batch_size=args.batch_size, max_length=args.seq_len, progress=False)

    t_profile = median_seconds(run_profile, args.repeats)
    rounds = n_from_fraction(args.fraction, L)
    t = time.perf_counter()
    fast = greedy_order(model, blocks, bos=bos, batch_size=args.batch_size, max_remove=rounds)
    t_greedy = time.perf_counter() - t
    k = min(args.naive_rounds, rounds)
    order, losses, t_naive = naive_order(model, blocks, bos, k, args.batch_size)
    t_same = sum(fast.extra["round_seconds"][:k])
    cands = sum(L - j for j in range(k))
    same = "yes" if order == fast.order[:k] else f"NO ({order} vs {fast.order[:k]})"
    diff = max(abs(a - b) for a, b in zip(losses, fast.losses))
    full_cells, note = "not run | -", None
    if args.full:
        t = time.perf_counter()
        full = greedy_order(model, blocks, bos=bos, batch_size=args.batch_size)
        t_full = time.perf_counter() - t
        full_cells = f"{t_full:.0f} | **{t_full / t_profile:.0f}x**"
        note = (f"- {name}: full order {full.order}; calibration loss {full.base_loss:.3f} unpruned, "
                + ", ".join(f"{loss:.3f} after {n}" for n, loss in enumerate(full.losses, 1)
                            if n in (rounds, L // 2, L - 1)))
    row = (f"| {name} | {L} | {fast.tokens} / {kept['table'].tokens} | {t_profile:.2f} | {rounds} | {t_greedy:.1f} | "
           f"**{t_greedy / t_profile:.0f}x** | {t_naive:.1f} | {t_same:.1f} | **{t_naive / t_same:.2f}x** | "
           f"{t_same / cands / t_profile:.2f} / {t_naive / cands / t_profile:.2f} | {same}, {diff:.1e} | "
           f"{full_cells} |")
    return row, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-rounds", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also time the full order (L - 1 rounds)")
    args = ap.parse_args()

    from ray_prune.core.data import load_texts

    texts = load_texts("calibration", 8 * args.blocks + 16)
    print(f"# Greedy order cost ({device_tag()})\n\n{machine()}; fp32; {args.blocks} packed C4 calibration blocks of "
          f"{args.seq_len} tokens, batch {args.batch_size}; greedy up to the {args.fraction:.0%} of layers a sweep "
          f"with that largest fraction needs (r rounds), naive for its first {args.naive_rounds}; profile: median of "
          f"{args.repeats}, the rest one run each\n")
    print("| model | L | tokens (greedy / profile) | profile s | r | greedy, r rounds s | **greedy r rounds / "
          f"profile** | naive, {args.naive_rounds} rounds s | greedy, same rounds s | **naive / greedy** | per "
          "candidate, greedy / naive (profile passes) | same order, max loss diff | greedy full order s | **full "
          "order / profile** |")
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
