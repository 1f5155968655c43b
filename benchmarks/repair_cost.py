"""Linear repair (ReplaceMe): its cost against one profile pass and one heal, and what it does to the C4 loss.

For each model, the layers ``--fraction`` removes by the paper's rule (``similarity`` on the angular table of the
calibration set), and on one calibration set (the first of ``--blocks`` packed C4 calibration blocks of
``--seq-len`` tokens; the profile reads the same blocks, decoded to text and cut at ``--seq-len`` tokens):
- ``profile``: ``ray_prune.core.profile.profile``, one pass;
- ``linear``: ``ray_prune.core.repair.linear_repair`` (the full T, or the diagonal one where the family takes no
  other) on a fresh copy of the model (the copy is not timed), interleaved with the profile (``--repeats``), on
  the first calibration size;
- ``heal``: ``ray_prune.core.heal.loop.heal`` (LoRA rank 8 on the FFN, ``--quantize``) of the plainly pruned model,
  ``--heal-steps`` steps of ``--heal-batch`` x ``--heal-seq-len`` tokens; the median steady step (steps 2..S-1,
  ``heal_throughput.StepClock``) is scaled by tokens to the paper's heal, 5000 steps of 16 x 1024 tokens. Scaling
  by tokens leaves out attention's growth with the sequence length, so the paper-sized heal is if anything
  cheaper here than it would be.
Then the held-out C4 loss (``core.loss.c4_loss`` on the ``test`` role, ``--c4-blocks`` blocks of
``--c4-seq-len`` tokens) of the full model, of plain removal and of each repair, with each fit's stream error at
the cut (mean squared error per token, plain removal's and the fit's), for each calibration size of ``--blocks``
(the least squares of a d x d map wants many more tokens than d).

    python benchmarks/repair_cost.py --models smollm2-135m gemma3-270m --blocks 16 48 --seq-len 256
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time

from timing import device_tag, interleaved_medians, machine

PAPER_HEAL_TOKENS = 5000 * 16 * 1024


def heal_step_seconds(pruned, tok, args) -> float:
    """The median steady step of a short LoRA heal of ``pruned`` (a copy is healed)."""
    from heal_throughput import StepClock

    from ray_prune.core.data import load_texts
    from ray_prune.core.heal.config import HealConfig
    from ray_prune.core.heal.loop import heal
    from ray_prune.core.heal.lora import prepare_for_healing
    from ray_prune.core.packing import pack_texts

    config = HealConfig(steps=args.heal_steps, batch_size=args.heal_batch, seq_len=args.heal_seq_len,
                        quantize=args.quantize, warmup_steps=1, eval_every=10**6, val_sequences=1, dtype="fp32")
    train = pack_texts(load_texts("heal", 200), tok, args.heal_seq_len,
                       max_blocks=args.heal_steps * args.heal_batch)
    model = prepare_for_healing(copy.deepcopy(pruned), config)
    clock = StepClock(model)
    heal(model, tok, config, train_blocks=train, val_blocks=train[:1], progress=False)
    steps = clock.steady()
    del model
    gc.collect()
    return statistics.median(s for s, _ in steps)


def forms(model_type: str) -> list[str]:
    """The repairs a family takes: the full T where it folds exactly, and the diagonal one."""
    from ray_prune.core.repair import POST_FFN_NORM

    return ["diagonal"] if model_type in POST_FFN_NORM else ["full", "diagonal"]


def measure(name: str, texts: list[str], args) -> tuple[str, list[str], list[str]]:
    """One model's cost row, C4-loss rows and refusals."""
    from ray_prune.core.architecture import family_of
    from ray_prune.core.loss import c4_blocks, c4_loss
    from ray_prune.core.models import load_model
    from ray_prune.core.packing import pack_texts
    from ray_prune.core.profile import profile
    from ray_prune.core.prune import prune_layers
    from ray_prune.core.repair import check_linear_repair, linear_repair
    from ray_prune.core.select import layers_to_remove, n_from_fraction
    from ray_prune.errors import UserError

    model, tok = load_model(name, dtype="fp32")
    model_type, _ = family_of(model)
    L = model.config.num_hidden_layers
    sizes = sorted(args.blocks)
    packed = pack_texts(texts, tok, args.seq_len, max_blocks=sizes[-1])
    if packed.shape[0] < sizes[-1]:
        raise SystemExit(f"only {packed.shape[0]} blocks of calibration text")
    blocks = packed[:sizes[0]]  # the cost is measured on the smallest set
    docs = tok.batch_decode(blocks, skip_special_tokens=True)
    kept = {}

    def run_profile():
        kept["table"] = profile(model, tok, docs, batch_size=args.batch_size, max_length=args.seq_len, progress=False)

    run_profile()  # warm-up, and the table the layers are chosen from
    remove = layers_to_remove("similarity", L, n_from_fraction(args.fraction, L), table=kept["table"])
    form = forms(model_type)[0]

    def run_linear() -> float:
        repaired = copy.deepcopy(model)
        t = time.perf_counter()
        linear_repair(repaired, remove, blocks, batch_size=args.batch_size, form=form)
        return time.perf_counter() - t

    t = interleaved_medians({"profile": run_profile, "linear": run_linear}, args.repeats, warmup=0)
    test = c4_blocks(tok, args.c4_blocks, args.c4_seq_len)

    def c4(m) -> float:
        return c4_loss(m, tok, blocks=test, num_sequences=len(test), batch_size=4)["loss"]

    full_loss = c4(model)
    plain = prune_layers(model, remove, inplace=False)
    plain_loss = c4(plain)
    step = heal_step_seconds(plain, tok, args)
    del plain
    paper_heal = step / (args.heal_batch * args.heal_seq_len) * PAPER_HEAL_TOKENS
    cost_row = (f"| {name} | {form} | {blocks.numel()} | {t['profile']:.2f} | {t['linear']:.2f} | "
                f"**{t['linear'] / t['profile']:.2f}x** | {step:.2f} | {step / t['linear']:.2f}x | "
                f"{paper_heal / 3600:.0f} h | **{paper_heal / t['linear']:.0f}x** |")
    print(cost_row.replace("**", ""), flush=True)
    refusals = []
    try:
        check_linear_repair(model.config, "full")
    except UserError as e:
        refusals.append(f"- {name}: `full` refused: {e.problem}")
    loss_rows = []
    for size in sizes:
        for variant in forms(model_type):
            repaired = copy.deepcopy(model)
            t0 = time.perf_counter()
            report = linear_repair(repaired, remove, packed[:size], batch_size=args.batch_size, form=variant)
            seconds = time.perf_counter() - t0
            loss = c4(repaired)
            del repaired
            gc.collect()
            fit = report.runs[0] if len(report.runs) == 1 else None
            errors = f"{fit.plain_error:.3g} -> {fit.fit_error:.3g}" if fit else "several runs"
            loss_rows.append(f"| {name} | {remove[0]}..{remove[-1]} ({len(remove)}/{L}) | {variant} | "
                             f"{report.tokens} | {seconds:.1f} | {full_loss:.3f} | {plain_loss:.3f} | **{loss:.3f}** "
                             f"| {loss - plain_loss:+.3f} | {errors} |")
            print(loss_rows[-1].replace("**", ""), flush=True)
    return cost_row, loss_rows, refusals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 48],
                    help="calibration sizes, in blocks; the cost is measured on the first")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--heal-steps", type=int, default=5, help="at least 4: two are left out of the timing")
    ap.add_argument("--heal-batch", type=int, default=2)
    ap.add_argument("--heal-seq-len", type=int, default=256)
    ap.add_argument("--quantize", default="none", help="the heal's base: none (LoRA) or nf4 (QLoRA)")
    ap.add_argument("--c4-blocks", type=int, default=16)
    ap.add_argument("--c4-seq-len", type=int, default=256)
    args = ap.parse_args()

    from ray_prune.core.data import load_texts

    texts = load_texts("calibration")  # all of it: packing reads only what the largest size needs
    print(f"# Linear repair: cost and C4 loss ({device_tag()})\n\n{machine()}; fp32; {args.fraction:.0%} of the layers "
          f"removed by the similarity rule; calibration: {' or '.join(map(str, sorted(args.blocks)))} packed C4 "
          f"blocks of {args.seq_len} tokens, batch {args.batch_size}; profile and linear (on the first) interleaved, "
          f"median of {args.repeats}; heal: {args.quantize} base + rank-8 LoRA on the FFN, median steady step of "
          f"{args.heal_steps} steps of {args.heal_batch} x {args.heal_seq_len} tokens, scaled by tokens to 5000 x 16 x "
          f"1024; C4 loss on {args.c4_blocks} test blocks of {args.c4_seq_len} tokens; the rest one run each\n")
    cost_rows, loss_rows, refusals = [], [], []
    for name in args.models:
        cost, losses, refused = measure(name, texts, args)
        cost_rows.append(cost)
        loss_rows += losses
        refusals += refused
        gc.collect()

    print("\n## Cost\n")
    print("| model | repair | calibration tokens | profile s | linear s | **linear / profile** | heal step s | "
          "heal step / linear | heal, paper's 5000 x 16 x 1024 (scaled) | **paper heal / linear** |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(cost_rows))
    print("\n## C4 loss (nats, held-out test role)\n")
    print("| model | removed | repair | calibration tokens | linear s | unpruned | plain removal | **repaired** | "
          "repaired - plain | stream error at the cut, plain -> fit (per token) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(loss_rows))
    if refusals:
        print("\n" + "\n".join(refusals))
    print("\nlinear runs the full model's blocks up to the end of the removed run (its targets) and the block before "
          "the cut twice more, with no LM head, and solves one d x d system per run; profile runs every block once. "
          "The diagonal form is the one exact fold for Gemma-2/3 (into the post-feedforward norm's scale).")


if __name__ == "__main__":
    main()
