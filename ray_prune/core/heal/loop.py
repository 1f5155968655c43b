"""The healing loop: LoRA training on packed C4 with AdamW, a warmup + cosine schedule, and exact resume.

The paper freezes the pruned model in 4-bit NF4 and trains rank-8 LoRA
adapters on the FFN projections with a next-token loss on C4; :func:`heal`
is that loop. It trains on packed blocks (documents joined by EOS and cut into
``seq_len`` pieces, so no compute goes to padding), evaluates a fixed
validation set every ``eval_every`` steps, and can checkpoint and resume
exactly (``checkpoint``, ``schedule``).

The loop is hand-written instead of HF ``Trainer``: it never syncs the device
between evaluations, builds no per-step logging state, and its checkpoint
holds only what resuming needs (measured 1.05x Trainer's throughput on the same
QLoRA model, ``benchmarks/heal_throughput.py``). It does not import Ray; the
sweep drives it through ``callback`` (raise from it to stop a trial early).
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ray_prune.core.data import TextSource, iter_role
from ray_prune.core.heal.checkpoint import CHECKPOINT_PREFIX, find_checkpoint, remove_stale, restore, save_checkpoint
from ray_prune.core.heal.config import HealConfig
from ray_prune.core.heal.schedule import SampleOrder, lr_factor
from ray_prune.core.loss import next_token_loss
from ray_prune.core.packing import pack_stream, pack_texts, scored_bos, targets


@dataclass
class HealReport:
    """One evaluation point; what the callback (and the sweep's scheduler) sees."""

    step: int
    train_loss: float  # mean training loss over the steps since the previous report
    val_loss: float  # mean next-token CE (nats) on the fixed validation blocks
    tokens_seen: int  # training tokens consumed so far (step * batch_size * grad_accum * seq_len)
    lr: float  # learning rate used for this step's update
    elapsed_s: float  # wall time of the run so far, across resumes
    checkpoint: str | None = None  # checkpoint written at this step, if checkpointing


def blocks_hash(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()[:16]


def train_blocks_for(tokenizer, config: HealConfig, data_dir: str | None = None,
                     source: TextSource | None = None) -> torch.Tensor:
    """Exactly the packed training blocks ``config`` consumes (steps x sequences per step), from the C4 heal role."""
    need = config.steps * config.sequences_per_step
    return pack_stream(iter_role("heal", "c4", data_dir, source), tokenizer, config.seq_len, max_blocks=need)


def selection_blocks_for(tokenizer, seq_len: int, val_sequences: int, data_dir: str | None = None,
                         source: TextSource | None = None) -> torch.Tensor:
    """The fixed heal validation blocks, from the C4 selection role (never the test role the rows report)."""
    return pack_stream(iter_role("selection", "c4", data_dir, source), tokenizer, seq_len, max_blocks=val_sequences)


def heal_blocks(tokenizer, config: HealConfig, train_texts: Sequence[str] | None,
                val_texts: Sequence[str] | None, data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed training and validation blocks: of the given texts (all their blocks), else of the C4 roles."""
    train = (pack_texts(train_texts, tokenizer, config.seq_len) if train_texts is not None
             else train_blocks_for(tokenizer, config, data_dir))
    val = (pack_texts(val_texts, tokenizer, config.seq_len, max_blocks=config.val_sequences) if val_texts is not None
           else selection_blocks_for(tokenizer, config.seq_len, config.val_sequences, data_dir))
    return train, val


def _check_blocks(train: torch.Tensor, val: torch.Tensor, config: HealConfig) -> torch.Tensor:
    """Warn where the data is short of what the settings ask for; the validation set capped at val_sequences."""
    if val.shape[0] < config.val_sequences:
        warnings.warn(f"validation text gives {val.shape[0]} blocks of {config.seq_len} tokens, "
                      f"fewer than val_sequences={config.val_sequences}; using all of them", stacklevel=3)
    passes = config.steps * config.sequences_per_step / train.shape[0]
    if passes > 1:
        warnings.warn(f"training text gives {train.shape[0]} blocks of {config.seq_len} tokens; "
                      f"{config.steps} steps of {config.sequences_per_step} sequences make {passes:.2f} passes "
                      "over it", stacklevel=3)
    return val[: config.val_sequences]


def _paged_adamw_8bit(params: list, config: HealConfig, device: torch.device):
    """bitsandbytes' ``PagedAdamW8bit`` (QLoRA's optimizer: 8-bit moments, paged on CUDA), with torch AdamW's betas
    and eps. Refused, with the fix, where bitsandbytes is missing or cannot run it: a one-step trial on a scratch
    parameter large enough for the 8-bit path (bitsandbytes keeps tensors under 4096 elements in 32 bits) proves
    the device's kernels work before the run depends on them. Paging is a CUDA feature: elsewhere (bitsandbytes 0.45+
    runs the 8-bit update on a CPU) the same update runs as ``AdamW8bit``, unpaged, and a warning says so."""
    from ray_prune.errors import UserError

    fix = "use heal optimizer: adamw (the paper's), which runs everywhere"
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UserError(f"heal optimizer paged_adamw_8bit needs bitsandbytes ({e})",
                        "pip install bitsandbytes, or " + fix) from None
    if device.type not in ("cuda", "cpu", "xpu"):
        raise UserError(f"bitsandbytes has no 8-bit optimizer for {device.type} devices", fix)
    kind = bnb.optim.PagedAdamW8bit if device.type == "cuda" else bnb.optim.AdamW8bit
    try:
        scratch = torch.nn.Parameter(torch.zeros(4096, device=device))
        scratch.grad = torch.ones_like(scratch)
        kind([scratch], lr=1e-3).step()
    except (RuntimeError, NotImplementedError, AttributeError, ValueError) as e:
        raise UserError(f"bitsandbytes {bnb.__version__} cannot run its 8-bit AdamW on {device} "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__})", fix) from None
    optimizer = kind(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if device.type != "cuda":
        warnings.warn(f"heal optimizer paged_adamw_8bit on {device.type}: 8-bit moments, but not paged (bitsandbytes "
                      "pages CUDA memory only)", stacklevel=3)
    return optimizer


def _optimizer(params: list, config: HealConfig, device: torch.device):
    if config.optimizer == "paged_adamw_8bit":
        optimizer = _paged_adamw_8bit(params, config, device)
    else:
        # fused: one kernel for the whole update of ~100s of small LoRA tensors (3.0 vs 7.7 ms per step for
        # foreach on SmolLM2's, CPU); foreach where no fused kernel exists.
        fused = device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                                       for p in params)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                      **({"fused": True} if fused else {"foreach": True}))
    warmup = config.effective_warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, config.steps))
    return optimizer, scheduler


def heal(
    model,
    tokenizer,
    config: HealConfig,
    train_texts: Sequence[str] | None = None,
    val_texts: Sequence[str] | None = None,
    callback: Callable[[HealReport], None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    train_blocks: torch.Tensor | None = None,
    val_blocks: torch.Tensor | None = None,
):
    """Train LoRA adapters on packed text; return ``(peft_model, reports)``.

    ``model`` is a model from ``prepare_for_healing``, or anything that
    function accepts (it is then prepared here). Texts default to the C4
    "heal" role (exactly the blocks the steps consume) and the "selection" role
    (validation), disjoint from calibration data and from the test role the
    reported loss uses; ``train_blocks``/``val_blocks`` pass packed blocks
    instead (the sweep packs them once for all its trials). Every
    ``eval_every`` steps and at the last step the validation loss is computed
    on the first ``val_sequences`` packed blocks, a checkpoint is written if
    ``checkpoint_dir`` is given, and ``callback(report)`` runs; an exception
    from the callback propagates (the sweep stops trials that way), after the
    checkpoint is safely on disk.

    ``resume_from`` (a checkpoint, or a directory holding ``checkpoint-*``;
    an existing directory without one starts fresh, so a restarted job can
    always pass its own checkpoint_dir) restores adapter, optimizer,
    scheduler, RNG and data position: the continued run reproduces the losses
    of an uninterrupted one. The returned reports include the resumed ones.
    """
    from ray_prune.core.heal.lora import prepare_for_healing

    config.validate()
    if not hasattr(model, "peft_config"):
        model = prepare_for_healing(model, config)
    device = next(model.parameters()).device
    if train_blocks is None or val_blocks is None:
        packed = heal_blocks(tokenizer, config, train_texts, val_texts, data_dir)
        train_blocks = packed[0] if train_blocks is None else train_blocks
        val_blocks = packed[1] if val_blocks is None else val_blocks
    val_blocks = _check_blocks(train_blocks, val_blocks, config)
    bos = scored_bos(tokenizer)
    data_hash = blocks_hash(train_blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters; was it prepared with prepare_for_healing?")
    optimizer, scheduler = _optimizer(params, config, device)

    start_step, prior_elapsed, reports = 0, 0.0, []
    checkpoint = find_checkpoint(resume_from) if resume_from is not None else None
    if checkpoint is not None:
        state = restore(checkpoint, model, optimizer, scheduler, config, data_hash)
        start_step, prior_elapsed = int(state["step"]), float(state["elapsed_s"])
        reports = [HealReport(**r) for r in state["reports"]]
    else:
        torch.manual_seed(config.seed)  # dropout masks
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_root is not None:
        remove_stale(ckpt_root)

    def on_eval(step: int, lr: float, train_loss: float, t0: float) -> None:
        val = next_token_loss(model, val_blocks, batch_size=config.batch_size, bos=bos)
        report = HealReport(step=step, train_loss=train_loss, val_loss=val,
                            tokens_seen=step * config.sequences_per_step * config.seq_len, lr=lr,
                            elapsed_s=prior_elapsed + time.perf_counter() - t0)
        if ckpt_root is not None:
            report.checkpoint = str(ckpt_root / f"{CHECKPOINT_PREFIX}{step:06d}")
            state = {"step": step, "elapsed_s": report.elapsed_s, "data_hash": data_hash,
                     "config": config.resume_key(), "full_config": asdict(config),
                     "reports": [asdict(r) for r in reports + [report]]}
            save_checkpoint(ckpt_root, model, optimizer, scheduler, step, state)
        reports.append(report)
        if callback is not None:
            callback(report)

    _train(model, params, optimizer, scheduler, train_blocks, bos, config, start_step, on_eval, progress)
    return model, reports


def _train(model, params, optimizer, scheduler, train_blocks: torch.Tensor, bos: int | None, config: HealConfig,
           start_step: int, on_eval: Callable[[int, float, float, float], None], progress: bool) -> None:
    """Steps ``start_step + 1 .. config.steps``; ``on_eval(step, lr, mean train loss, t0)`` at each evaluation."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    order = SampleOrder(train_blocks.shape[0], config.seed)
    t0 = time.perf_counter()
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    loss_sum = torch.zeros((), dtype=acc_dtype, device=device)  # summed on device: no sync per step
    loss_count = 0
    model.train()
    bar = tqdm(total=config.steps, initial=start_step, disable=not progress, desc="heal", unit="step",
               dynamic_ncols=True)
    try:
        for step in range(start_step + 1, config.steps + 1):
            lr = optimizer.param_groups[0]["lr"]
            for micro in range(config.grad_accum):
                first = ((step - 1) * config.grad_accum + micro) * config.batch_size
                ids = train_blocks[order.indices(first, config.batch_size)].to(device, non_blocking=True)
                loss = model(input_ids=ids, labels=targets(ids, bos), use_cache=False).loss
                (loss / config.grad_accum).backward()
                loss_sum += loss.detach().to(acc_dtype)
                loss_count += 1
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm, foreach=True)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            if step % config.eval_every and step != config.steps:
                continue
            train_loss = float(loss_sum.item() / max(1, loss_count))
            loss_sum.zero_()
            loss_count = 0
            on_eval(step, lr, train_loss, t0)
            bar.set_postfix(train=f"{train_loss:.3f}", refresh=False)
    finally:
        bar.close()
        model.eval()
