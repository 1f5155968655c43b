"""Heal a layer-pruned model with QLoRA, as in Gromov et al. (Sec. 3.2).

The paper freezes the pruned model in 4-bit NF4 and trains rank-8 LoRA
adapters on the FFN projections with a next-token loss on C4. This module is
that recipe as a small, self-contained training loop:

* ``prepare_for_healing`` loads the (pruned, saved) model with 4-bit NF4
  weights through bitsandbytes (``quantize="none"``: plain LoRA on full
  weights, for comparison) and attaches the adapters.
* ``heal`` trains on packed C4 blocks (documents joined by EOS and cut into
  ``seq_len`` pieces, so no compute goes to padding) with AdamW and a linear
  warmup + cosine schedule, evaluates a fixed validation set every
  ``eval_every`` steps, and can checkpoint/resume exactly.
* ``merge_adapter`` folds the adapter into unquantized weights for export.

The loop is hand-written instead of HF ``Trainer``: it never syncs the device
between evaluations, builds no per-step logging state, and its checkpoint
holds only what resuming needs. It does not import Ray; the sweep drives it
through ``callback`` (raise from it to stop a trial early).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from ray_prune.errors import UserError
from ray_prune.packing import pack_texts

CHECKPOINT_PREFIX = "checkpoint-"
STATE_JSON = "trainer_state.json"
STATE_PT = "training_state.pt"
_TMP_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
_BASE_ATTR = "_ray_prune_base"  # on the PeftModel: where its unquantized base weights live
_VALID_DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
# Settings that shape the training trajectory: a checkpoint only resumes under the same values.
_TRAJECTORY_FIELDS = ("steps", "batch_size", "grad_accum", "seq_len", "lr", "rank", "alpha", "dropout",
                      "warmup_steps", "weight_decay", "target", "quantize", "seed", "max_grad_norm")


@dataclass
class HealConfig:
    """Everything that determines a healing run; defaults follow the paper (QLoRA, rank 8, FFN targets)."""

    steps: int = 5000  # optimizer steps (each of batch_size * grad_accum sequences)
    batch_size: int = 16  # sequences per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step: a larger effective batch without more memory
    seq_len: int = 1024  # tokens per packed block
    lr: float = 3e-4
    rank: int = 8
    alpha: float | None = None  # None -> alpha = rank, i.e. LoRA scaling 1 (the paper's setting)
    dropout: float = 0.05  # LoRA dropout on the adapter input
    warmup_steps: int = 100  # linear warmup (clipped to `steps`), then cosine decay to 0
    weight_decay: float = 0.0
    target: str | list[str] = "ffn"  # "ffn" (paper), "all-linear", or explicit linear module names
    quantize: Literal["nf4", "none"] = "nf4"  # nf4 = QLoRA; none = LoRA on full-precision weights
    eval_every: int = 100  # steps between validation losses / callbacks / checkpoints
    val_sequences: int = 64  # packed validation blocks, fixed for the whole run
    seed: int = 0  # LoRA init, dropout and data order
    dtype: str = "auto"  # compute dtype; auto = bf16 on GPUs that have it, fp32 on CPU (see heal_dtype)
    max_grad_norm: float = 1.0  # global grad-norm clip; 0 disables
    gradient_checkpointing: bool = False  # trade compute for activation memory (big models on small GPUs)

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def effective_warmup(self) -> int:
        return min(self.warmup_steps, self.steps)

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def validate(self) -> None:
        """Fail early, with a fix, on values that would crash or silently mis-train later."""
        def need(ok: bool, problem: str, fix: str) -> None:
            if not ok:
                raise UserError(f"heal config: {problem}", fix)

        for name in ("steps", "batch_size", "grad_accum", "rank", "eval_every", "val_sequences"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} = {value!r}", f"set {name} to a positive integer")
        need(isinstance(self.seq_len, int) and self.seq_len >= 2, f"seq_len = {self.seq_len!r}",
             "set seq_len to an integer >= 2 (a block must hold at least one next-token prediction)")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0, f"lr = {self.lr!r}",
             "set lr to a positive number, e.g. 3e-4")
        need(self.alpha is None or (isinstance(self.alpha, (int, float)) and self.alpha > 0),
             f"alpha = {self.alpha!r}", "set alpha to a positive number, or None for alpha = rank")
        need(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, f"dropout = {self.dropout!r}",
             "set dropout in [0, 1)")
        need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, f"warmup_steps = {self.warmup_steps!r}",
             "set warmup_steps to an integer >= 0")
        need(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
             f"weight_decay = {self.weight_decay!r}", "set weight_decay >= 0")
        need(isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm >= 0,
             f"max_grad_norm = {self.max_grad_norm!r}", "set max_grad_norm >= 0 (0 disables clipping)")
        need(self.quantize in ("nf4", "none"), f"quantize = {self.quantize!r}",
             "use quantize='nf4' (QLoRA, as in the paper) or 'none' (plain LoRA)")
        need(self.dtype in _VALID_DTYPES, f"dtype = {self.dtype!r}", f"use one of {', '.join(_VALID_DTYPES)}")
        if isinstance(self.target, str):
            need(bool(self.target.strip()), "target is empty", "use 'ffn', 'all-linear' or a list of module names")
        else:
            need(isinstance(self.target, (list, tuple)) and len(self.target) > 0
                 and all(isinstance(t, str) and t for t in self.target),
                 f"target = {self.target!r}", "use 'ffn', 'all-linear' or a non-empty list of module names")


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


# ---------------------------------------------------------------------------------------------------------------
# data


def _default_texts(role: str, tokens_needed: int, data_dir: str | None) -> list[str]:
    """Enough documents of a C4 role for ``tokens_needed`` tokens (all of them from a small local mirror)."""
    from ray_prune.data import data_dir as resolve_data_dir
    from ray_prune.data import load_texts

    # C4 documents average ~480 SmolLM2 tokens; 200 leaves margin for other tokenizers and short docs.
    n = tokens_needed // 200 + 16
    root = resolve_data_dir(data_dir)
    if root is not None:  # a local mirror is small and read whole anyway: take what is there, up to n
        return load_texts(role, None, data_dir_path=root)[:n]  # type: ignore[arg-type]
    return load_texts(role, n)  # type: ignore[arg-type]


class _Order:
    """Sample order as a pure function of (seed, position): resuming at a step replays the same data."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2**63))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        out = torch.empty(count, dtype=torch.long)
        for k in range(count):
            epoch, pos = divmod(start + k, self.n)
            out[k] = self._perm_of(epoch)[pos]
        return out


def _blocks_hash(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# model


def heal_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The compute dtype for training.

    ``auto`` is bf16 on GPUs with bf16 support (the QLoRA recipe), fp32 elsewhere.
    On CPUs without AVX512-BF16/AMX, bf16 matmuls are slow: we measured a
    SmolLM2-135M NF4 training step at ~60-90 s in bf16 vs ~2 s in fp32 on an
    AVX2 EPYC (the backward ``grad @ W`` bf16 GEMM is ~25x slower than fp32).
    fp16 is never chosen automatically: LoRA training in fp16 needs loss scaling.
    """
    from ray_prune.models import parse_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.float32
    return parse_dtype(dtype, device)


def _linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the model's linear layers (bnb's Linear4bit is an nn.Linear), minus the LM head."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and m is not out_emb and name}
    return sorted(names)


def resolve_targets(model: nn.Module, target: str | Sequence[str]) -> list[str]:
    """LoRA target module names: "ffn" -> the family's FFN linears, "all-linear" -> every linear but the head.

    Explicit names must exist as linear layers; an unknown one is a UserError
    listing the names that do.
    """
    from ray_prune.architecture import ffn_modules

    available = _linear_names(model)
    if isinstance(target, str):
        if target == "ffn":
            return ffn_modules(model)
        if target == "all-linear":
            return available
        wanted = [target]
    else:
        wanted = list(target)
    missing = [t for t in wanted if t not in available]
    if missing:
        raise UserError(f"LoRA target module(s) {', '.join(missing)} not found in {type(model).__name__}",
                        f"use 'ffn', 'all-linear' or names among its linear layers: {', '.join(available)}")
    return wanted


def _bnb_config(compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:  # pragma: no cover - bitsandbytes is a dependency
        raise UserError(f"quantize='nf4' needs bitsandbytes ({e})",
                        "pip install bitsandbytes, or heal with quantize='none'") from e
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
                              bnb_4bit_use_double_quant=True)


def _is_4bit(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False))


def _load_base(path: str, config: HealConfig, dtype: torch.dtype, device: torch.device) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        if config.quantize == "nf4":
            return AutoModelForCausalLM.from_pretrained(path, quantization_config=_bnb_config(dtype), dtype=dtype,
                                                        device_map={"": device}, use_safetensors=True)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
    except OSError as e:
        raise UserError(f"could not load model {path!r} for healing: {e}".splitlines()[0],
                        "pass a directory written by save_pretrained (safetensors), or a bundled name") from e


def prepare_for_healing(model_path_or_model: str | os.PathLike | nn.Module, config: HealConfig,
                        device: str | torch.device | None = None):
    """Load (or take) the model, quantize it per ``config.quantize``, and attach fresh LoRA adapters.

    A saved model directory (or bundled name) is the normal input: it loads
    straight into 4-bit NF4. An in-memory model is used directly for
    ``quantize="none"`` (converted to the compute dtype and wrapped *in place*,
    as peft injects its layers into the model it is given); for ``nf4`` it is
    saved to a temporary directory and reloaded quantized, since bitsandbytes
    quantizes at load time. The directory lives as long as the returned model,
    because ``merge_adapter`` reloads the unquantized base from it.
    """
    from peft import LoraConfig

    from ray_prune.models import default_device, resolve

    config.validate()
    dev = torch.device(device) if device is not None else default_device()
    dtype = heal_dtype(config.dtype, dev)
    cleanup: str | None = None
    if isinstance(model_path_or_model, (str, os.PathLike)):
        base_path = resolve(str(model_path_or_model))
        model = _load_base(base_path, config, dtype, dev)
    elif isinstance(model_path_or_model, nn.Module):
        if hasattr(model_path_or_model, "peft_config"):
            raise UserError("the model already carries LoRA adapters",
                            "pass it straight to heal(), or pass the base model / its directory here")
        given = model_path_or_model
        if config.quantize == "none":
            model = given.to(device=dev, dtype=dtype)
            base_path = str(getattr(given.config, "_name_or_path", "") or "")
        elif _is_4bit(given):
            model, base_path = given, str(getattr(given.config, "_name_or_path", "") or "")
        else:
            cleanup = base_path = tempfile.mkdtemp(prefix="ray_prune_heal_base_")
            try:
                given.save_pretrained(base_path, safe_serialization=True)
                model = _load_base(base_path, config, dtype, dev)
            except BaseException:
                shutil.rmtree(base_path, ignore_errors=True)
                raise
    else:
        raise TypeError(f"expected a model directory or an nn.Module, got {type(model_path_or_model).__name__}")

    targets = resolve_targets(model, config.target)
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, lora_dropout=config.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(config.seed)  # LoRA A init is random: same seed, same adapter
    peft_model = _wrap(model, lora)
    setattr(peft_model, _BASE_ATTR, {"path": base_path, "dtype": str(dtype).removeprefix("torch."),
                                     "quantize": "nf4" if _is_4bit(model) else "none"})
    if cleanup is not None:
        weakref.finalize(peft_model, shutil.rmtree, cleanup, True)
    return peft_model


def _wrap(model: nn.Module, lora):
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft reads transformers' deprecated is_gradient_checkpointing property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def merge_adapter(peft_model, inplace: bool = False) -> nn.Module:
    """A plain transformers model with the adapter folded into its weights, ready for ``save_pretrained``.

    For an NF4 model the base is reloaded unquantized (in the healing compute
    dtype) from its directory and the adapter merged there: folding the update
    into 4-bit weights would re-quantize it and lose most of the healing. For
    ``quantize="none"`` the merge works on a copy unless ``inplace`` (which
    saves memory but consumes ``peft_model``).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = peft_model.get_base_model()
    if not _is_4bit(base):
        target = peft_model if inplace else copy.deepcopy(peft_model)
        merged = target.merge_and_unload()
        merged.config.use_cache = True
        return merged.eval()
    info = getattr(peft_model, _BASE_ATTR, None) or {}
    adapter = peft_model.active_adapter
    path = info.get("path") or peft_model.peft_config[adapter].base_model_name_or_path
    if not path or not (Path(path) / "config.json").is_file():
        raise UserError(f"the unquantized base of this 4-bit model is not on disk (looked for {path!r})",
                        "prepare the model from a saved directory, or save the adapter and apply it to the "
                        "full-precision model yourself")
    dtype = getattr(torch, info.get("dtype", "float32"))
    device = next(peft_model.parameters()).device
    with torch.random.fork_rng(devices=[]):  # fresh LoRA init must not disturb the caller's RNG stream
        plain = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device)
        lora = copy.deepcopy(peft_model.peft_config[adapter])
        lora.inference_mode = True
        wrapped = _wrap(plain, lora)
    result = set_peft_model_state_dict(wrapped, get_peft_model_state_dict(peft_model, adapter_name=adapter))
    bad = [k for k in getattr(result, "missing_keys", []) if "lora_" in k] + list(result.unexpected_keys)
    if bad:
        raise RuntimeError(f"adapter does not fit the reloaded base: {bad[:5]}")
    merged = wrapped.merge_and_unload()
    merged.config.use_cache = True
    return merged.eval()


# ---------------------------------------------------------------------------------------------------------------
# loss


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def validation_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over packed blocks, weighted by token.

    Every block predicts ``seq_len - 1`` tokens, so this is the mean over all
    predicted tokens. The model's train/eval mode is restored afterwards.
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"expected (num_blocks, seq_len >= 2) token blocks, got shape {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    device = _device_of(model)
    total = 0.0
    try:
        for i in range(0, blocks.shape[0], batch_size):
            ids = blocks[i: i + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1), reduction="sum").item()
    finally:
        model.train(was_training)
    return total / (blocks.shape[0] * (blocks.shape[1] - 1))


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to the peak, then cosine decay to 0.

    Unlike HF's cosine schedule the warmup starts at lr/warmup, not 0, so the
    first step is not wasted (with warmup_steps=1 it trains at full lr).
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _trajectory(config: HealConfig) -> dict[str, Any]:
    d = asdict(config)
    out = {k: d[k] for k in _TRAJECTORY_FIELDS}
    out["target"] = out["target"] if isinstance(out["target"], str) else list(out["target"])
    return out


def _save_adapter_files(peft_model, directory: Path) -> None:
    # save_embedding_layers=False: only the LoRA weights, and no hub lookup of the base config.
    peft_model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
    readme = directory / "README.md"  # peft's model-card stub says nothing we do not record ourselves
    if readme.is_file():
        readme.unlink()


def _save_checkpoint(root: Path, peft_model, optimizer, scheduler, step: int, state: dict[str, Any]) -> Path:
    """Adapter + training state in ``root/checkpoint-NNNNNN``, written to a temp dir and renamed into place.

    The adapter is also copied to ``root`` itself (one file rename each), so
    ``PeftModel.from_pretrained(model, root)`` always loads the newest adapter.
    Older checkpoints are removed once the new one is in place.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step:06d}-", dir=root))
    try:
        _save_adapter_files(peft_model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
                   tmp / STATE_PT)
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
        for name in os.listdir(tmp):  # the newest adapter at the top level, file by file
            if name.startswith("adapter_"):
                shutil.copy2(tmp / name, root / f".{name}.tmp")
                os.replace(root / f".{name}.tmp", root / name)
        tmp.chmod(0o755)
        if final.exists():  # re-running a step after a resume: swap the old one out first
            old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-", dir=root))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for other in root.glob(f"{CHECKPOINT_PREFIX}*"):
        if other.is_dir() and other != final:
            shutil.rmtree(other, ignore_errors=True)
    return final


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint at ``path``, or the newest ``checkpoint-*`` inside it; None if the directory has none."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"checkpoint {p} does not exist", "pass a checkpoint directory written by heal()")
    if (p / STATE_JSON).is_file():
        return p
    found = sorted(c for c in p.glob(f"{CHECKPOINT_PREFIX}*") if (c / STATE_JSON).is_file())
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------------------------
# training


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
):
    """Train LoRA adapters on packed text; return ``(peft_model, reports)``.

    ``model`` is a model from ``prepare_for_healing``, or anything that
    function accepts (it is then prepared here). Texts default to the C4
    "heal" and "validation" roles, disjoint from calibration data. Every
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
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    config.validate()
    if not hasattr(model, "peft_config"):
        model = prepare_for_healing(model, config)
    device = _device_of(model)

    step_seqs = config.sequences_per_step
    if train_texts is None:
        train_texts = _default_texts("heal", config.steps * step_seqs * config.seq_len, data_dir)
    if val_texts is None:
        val_texts = _default_texts("validation", config.val_sequences * config.seq_len, data_dir)
    train_blocks = pack_texts(train_texts, tokenizer, config.seq_len)
    val_blocks = pack_texts(val_texts, tokenizer, config.seq_len, max_blocks=config.val_sequences)
    if val_blocks.shape[0] < config.val_sequences:
        warnings.warn(f"validation text gives {val_blocks.shape[0]} blocks of {config.seq_len} tokens, "
                      f"fewer than val_sequences={config.val_sequences}; using all of them", stacklevel=2)
    val_blocks = val_blocks[: config.val_sequences]
    passes = config.steps * step_seqs / train_blocks.shape[0]
    if passes > 1:
        warnings.warn(f"training text gives {train_blocks.shape[0]} blocks of {config.seq_len} tokens; "
                      f"{config.steps} steps of {step_seqs} sequences make {passes:.2f} passes over it",
                      stacklevel=2)
    data_hash = _blocks_hash(train_blocks)
    order = _Order(train_blocks.shape[0], config.seed)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters; was it prepared with prepare_for_healing?")
    # fused: one kernel for the whole update of ~100s of small LoRA tensors (3.0 vs 7.7 ms per step for
    # foreach on SmolLM2's, CPU); foreach where no fused kernel exists.
    fused = device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                                   for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  **({"fused": True} if fused else {"foreach": True}))
    warmup = config.effective_warmup
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, warmup, config.steps))

    start_step, prior_elapsed, reports = 0, 0.0, []
    checkpoint = find_checkpoint(resume_from) if resume_from is not None else None
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE_JSON).read_text())
        mismatched = {k: (state["config"].get(k), v) for k, v in _trajectory(config).items()
                      if state["config"].get(k) != v}
        if mismatched:
            raise UserError(f"checkpoint {checkpoint} was written with other settings: "
                            + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in mismatched.items()),
                            "resume with the settings it was trained with, or start a fresh run")
        if state["data_hash"] != data_hash:
            raise UserError(f"checkpoint {checkpoint} was trained on other text (data hash differs)",
                            "resume with the same training texts and tokenizer, or start a fresh run")
        result = set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise UserError(f"checkpoint {checkpoint} does not fit this model ({result.unexpected_keys[:3]} ...)",
                            "resume onto the model the checkpoint was trained from")
        blob = torch.load(checkpoint / STATE_PT, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        _set_rng_state(blob["rng"])
        start_step, prior_elapsed = int(state["step"]), float(state["elapsed_s"])
        reports = [HealReport(**r) for r in state["reports"]]
    else:
        torch.manual_seed(config.seed)  # dropout masks

    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt_root is not None and ckpt_root.is_dir():  # leftovers of a process killed mid-save
        for stale in ckpt_root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

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
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
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

            val = validation_loss(model, val_blocks, batch_size=config.batch_size)
            report = HealReport(step=step, train_loss=float(loss_sum.item() / max(1, loss_count)), val_loss=val,
                                tokens_seen=step * step_seqs * config.seq_len, lr=lr,
                                elapsed_s=prior_elapsed + time.perf_counter() - t0)
            loss_sum.zero_()
            loss_count = 0
            if ckpt_root is not None:
                report.checkpoint = str(ckpt_root / f"{CHECKPOINT_PREFIX}{step:06d}")
                state = {"step": step, "elapsed_s": report.elapsed_s, "data_hash": data_hash,
                         "config": _trajectory(config), "full_config": asdict(config),
                         "reports": [asdict(r) for r in reports + [report]]}
                _save_checkpoint(ckpt_root, model, optimizer, scheduler, step, state)
            reports.append(report)
            bar.set_postfix(train=f"{report.train_loss:.3f}", val=f"{val:.3f}", refresh=False)
            if callback is not None:
                callback(report)
    finally:
        bar.close()
        model.eval()
    return model, reports


__all__ = ["HealConfig", "HealReport", "pack_texts", "prepare_for_healing", "heal", "merge_adapter",
           "validation_loss", "resolve_targets", "heal_dtype", "find_checkpoint"]
