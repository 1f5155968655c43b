"""Linear repair of removed layers (ReplaceMe, Shopkhoev et al., 2025): training-free, folded into existing weights.

Where a run of blocks [i, e) is removed, the pruned model hands block e the
stream x^i where the full model handed it x^e. Block i-1, the last kept one
before the cut, ends by adding its MLP's output m to the residual stream:
x^i = y + m. A d x d matrix T is fitted by least squares on calibration
activations so that y + m T stands in for x^e,

    T = argmin_T || m T - r ||^2,   r = x^e - y = x^e - x^i + m,

which is ReplaceMe's ``lstsq`` objective (its a1 = m, a2 = x^e + m - x^i). T is
then folded into the weights that produce m, so the repaired model is an
ordinary model of L - n blocks (``save_pretrained``, plain transformers, KV
cache): the MLP's output projection W (out = z W^T + b) becomes T^T W and its
bias T^T b.

Choices, each where ReplaceMe leaves a gap:

- Targets come from the full model; the inputs m, x^i of a later run come from
  the model with the earlier runs already removed and repaired (runs are
  fitted shallow to deep), so each fit corrects what the pruned model really
  feeds it. With one run, as similarity selection gives, this is ReplaceMe's fit.
- The normal equations m^T m and m^T r are summed in fp64 over every token of
  packed calibration blocks (no padding exists to leave out; ReplaceMe sums
  over its padding too).
- The solve adds a ridge that pulls T toward the identity,
  (m^T m + lam I) T = m^T r + lam I with lam = ridge * trace(m^T m) / d. T = I
  is plain removal, so a direction the calibration never excites keeps the MLP
  output it had rather than losing it (ReplaceMe's optional ridge pulls toward
  zero). The default, 1e-4, matters only where m^T m is near singular (fewer
  calibration tokens than channels, dead channels); a huge ridge gives back
  plain removal.
- A run that starts at layer 0 has no block before it: m is then x^0 itself
  (y = 0) and T folds into the token embedding, exactly, as x^0 is linear in
  it. A model whose embedding is tied to its LM head cannot take that fold
  without changing its output layer, and is refused (ReplaceMe cannot repair a
  run at layer 0 at all).
- Gemma-2 and Gemma-3 pass the MLP output through an RMSNorm
  (``post_feedforward_layernorm``) before the residual add: m = g * u / rms(u).
  A full T folded into the down projection would change rms(u), so that fold
  is not exact, and ``form="full"`` is refused for them. ``form="diagonal"``
  fits a per-channel scale t instead (each channel's own least squares,
  t_k = (m_k . r_k + lam) / (m_k . m_k + lam)), which folds exactly into that
  norm's scale (Gemma's is 1 + weight, so weight' = (1 + weight) t - 1), or
  into the output projection's rows elsewhere. It is a weaker map than the
  full T; ReplaceMe's ``diag`` option fits the same one.

Cost: blocks 0 .. e-1 of the full model once for the targets (e the deepest
run's end), then the pruned model's kept blocks from the first cut to the last
once more for the inputs, the block before each cut twice; no LM head; one
d x d solve per run. With one run that is at most a decoder pass plus a block.
Memory: the calibration activations two to three times over (the targets, the
pruned stream) and the recorded block arguments.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ray_prune.core.architecture import decoder_layers, family_of, ffn_modules
from ray_prune.core.prune import prune_layers
from ray_prune.core.replay import record
from ray_prune.core.select import REPAIR_FORMS, check_layers
from ray_prune.errors import UserError

Form = Literal["full", "diagonal"]  # REPAIR_FORMS
DEFAULT_RIDGE = 1e-4
# Families whose MLP output passes through this norm before the residual add; its scale is 1 + weight.
POST_FFN_NORM: dict[str, str] = {"gemma2": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm"}


@dataclass
class RunFit:
    """The fit of one removed run [start, end) (indices of the model repaired)."""

    start: int
    end: int
    fold: str  # the weight T went into: a module path of the model before pruning
    plain_error: float  # mean over tokens of ||x^i - x^e||^2: the stream error of plain removal (T = I)
    fit_error: float  # mean over tokens of ||y + m T - x^e||^2 on the calibration set
    transform: torch.Tensor | None = field(default=None, repr=False)  # T (d x d, or the diagonal t), fp64, CPU


@dataclass
class LinearRepair:
    """What :func:`linear_repair` did: one fit per run, the calibration it used and its time."""

    form: str
    ridge: float
    tokens: int  # calibration tokens each fit summed over
    runs: list[RunFit]
    seconds: float

    def to_dict(self) -> dict:
        """JSON-able: the transforms are left out."""
        return {"method": "linear", "form": self.form, "ridge": self.ridge, "tokens": self.tokens,
                "seconds": self.seconds,
                "runs": [{k: getattr(r, k) for k in ("start", "end", "fold", "plain_error", "fit_error")}
                         for r in self.runs]}


def contiguous_runs(remove: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs [start, end) of consecutive indices, shallow to deep."""
    out: list[list[int]] = []
    for i in sorted(set(remove)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return [(a, b) for a, b in out]


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def check_linear_repair(config, form: str = "full", remove: Sequence[int] | None = None) -> None:
    """Refuse, with the reason and a fix, a repair that cannot be folded exactly: what a sweep can check at plan
    time from the config (and, once they are chosen, the layers)."""
    model_type, _ = family_of(config)
    if form not in REPAIR_FORMS:
        raise UserError(f"unknown linear repair form {form!r}", f"use one of {', '.join(REPAIR_FORMS)}")
    if form == "full" and model_type in POST_FFN_NORM:
        raise UserError(
            f"linear repair (full) cannot fold exactly into {model_type}: its MLP output passes through "
            f"{POST_FFN_NORM[model_type]} (an RMSNorm) before the residual add, which would renormalise m T",
            "use the diagonal form, a per-channel scale that folds exactly into that norm's weight")
    if remove is not None and 0 in set(remove) and _tied(config):
        raise UserError(
            f"linear repair of a run starting at layer 0 folds into the token embedding, which this {model_type} "
            "model ties to its LM head: the fold would change the output layer too",
            "keep layer 0, or repair without it")


def default_form(config) -> Form:
    """The linear repair's form for a model: ReplaceMe's full d x d transform where it folds exactly into the
    weights before the cut, else the per-channel scale (the one exact fold where the MLP output passes a norm
    before the residual, as in Gemma-2/3). What a sweep and ``ray-prune prune --repair linear`` use by default."""
    try:
        check_linear_repair(config, "full", None)
        return "full"
    except UserError:
        return "diagonal"


def _output_projection(layer: nn.Module, name: str) -> tuple[str, nn.Linear]:
    found = [(n, m) for n, m in layer.named_modules() if n.rsplit(".", 1)[-1] == name]
    if len(found) != 1 or not isinstance(found[0][1], nn.Linear):
        raise RuntimeError(f"expected one linear {name!r} in {type(layer).__name__}, found {len(found)}")
    return found[0]


def _fold_site(model: nn.Module, layers: nn.ModuleList, start: int, form: str) -> tuple[str, nn.Module, str]:
    """(path, module, kind) of the module whose output is m for a run starting at ``start``: where T folds.
    ``kind`` is how: ``embedding``, ``linear`` (the MLP's output projection) or ``norm`` (a 1 + weight scale)."""
    model_type, fam = family_of(model)
    if start == 0:
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
        if out is not None and out.weight is emb.weight:
            check_linear_repair(model.config, form, [0])  # raises: the embedding is the LM head too
        return next(n for n, m in model.named_modules() if m is emb), emb, "embedding"
    layer = layers[start - 1]
    prefix = f"{fam.layers_path}.{start - 1}."
    if model_type in POST_FFN_NORM:
        name = POST_FFN_NORM[model_type]
        return prefix + name, getattr(layer, name), "norm"
    if any("post_feedforward" in n for n, _ in layer.named_modules()):
        raise RuntimeError(f"{model_type} has a post-feedforward norm that repair.POST_FFN_NORM does not list")
    name, module = _output_projection(layer, ffn_modules(model)[-1])
    return prefix + name, module, "linear"


def _check_weights(module: nn.Module, path: str) -> None:
    weight = module.weight
    if not weight.is_floating_point() or weight.device.type == "meta":
        raise UserError(f"linear repair folds into {path}, whose weight is {weight.dtype} on {weight.device}",
                        "repair the model loaded in full precision (not 4-bit), whole on one device")


class _Normal:
    """Running fp64 sums of the least-squares problem m T ~ r: m^T m, m^T r and r . r, or only the diagonals of
    the first two where T is diagonal (each channel its own problem)."""

    def __init__(self, d: int, device: torch.device, diagonal: bool) -> None:
        shape = (d,) if diagonal else (d, d)
        self.diagonal = diagonal
        self.mm = torch.zeros(shape, dtype=torch.float64, device=device)
        self.mr = torch.zeros(shape, dtype=torch.float64, device=device)
        self.rr = 0.0
        self.tokens = 0

    def add(self, m: torch.Tensor, r: torch.Tensor) -> None:
        m = m.reshape(-1, m.shape[-1]).to(self.mm.device, torch.float64)
        r = r.reshape(-1, r.shape[-1]).to(self.mm.device, torch.float64)
        if self.diagonal:
            self.mm += (m * m).sum(0)
            self.mr += (m * r).sum(0)
        else:
            self.mm += m.T @ m
            self.mr += m.T @ r
        self.rr += float((r * r).sum())
        self.tokens += m.shape[0]

    def solve(self, ridge: float) -> torch.Tensor:
        """T (d x d), or the diagonal t (d,)."""
        d = self.mm.shape[0]
        diag_mm = self.mm if self.diagonal else torch.diagonal(self.mm)
        lam = ridge * float(diag_mm.sum()) / d
        if self.diagonal:
            return (self.mr + lam) / (self.mm + lam)
        eye = torch.eye(d, dtype=torch.float64, device=self.mm.device)
        return torch.linalg.solve(self.mm + lam * eye, self.mr + lam * eye)

    def error(self, T: torch.Tensor) -> float:
        """Mean over tokens of ||m T - r||^2, from the sums alone."""
        if self.diagonal:
            sq = (T * T * self.mm).sum() - 2 * (T * self.mr).sum() + self.rr
        else:
            sq = torch.trace(T.T @ self.mm @ T) - 2 * torch.trace(T.T @ self.mr) + self.rr
        return float(sq) / self.tokens

    def identity(self) -> torch.Tensor:
        """The T of plain removal."""
        d = self.mm.shape[0]
        return torch.ones(d, dtype=torch.float64, device=self.mm.device) if self.diagonal else torch.eye(
            d, dtype=torch.float64, device=self.mm.device)


def _fold(module: nn.Module, kind: str, T: torch.Tensor) -> None:
    """Make ``module``'s output o become o T (or o * t for a diagonal t), exactly."""
    diag = T.ndim == 1
    weight = module.weight
    T = T.to(weight.device)
    W = weight.detach().double()
    if kind == "embedding":  # rows are token vectors, and x^0 = E[ids] (times a constant scale in Gemma)
        new = W * T if diag else W @ T
    elif kind == "linear":  # out = z W^T + b, so o T = z (T^T W)^T + T^T b
        new = T[:, None] * W if diag else T.T @ W
        if module.bias is not None:
            b = module.bias.detach().double()
            module.bias.copy_((b * T if diag else T.T @ b).to(module.bias.dtype))
    elif kind == "norm" and diag:  # Gemma's RMSNorm: o = x / rms(x) * (1 + weight)
        new = (1.0 + W) * T - 1.0
    else:
        raise RuntimeError(f"cannot fold a {'diagonal' if diag else 'full'} transform into a {kind}")
    weight.copy_(new.to(weight.dtype))


def _check_inputs(blocks: torch.Tensor, batch_size: int, ridge: float) -> None:
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise UserError(f"ridge must be >= 0, got {ridge!r}", "use a small ridge such as 1e-4")
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2 or batch_size < 1:
        raise UserError(f"expected (num_blocks, seq_len >= 2) token blocks and batch_size >= 1, got "
                        f"{tuple(blocks.shape)} and {batch_size}", "pack calibration texts with packing.pack_texts")


def _full_model_streams(layers, batches: list, runs: list[tuple[int, int]]):
    """From the unpruned model: the targets x^e of every run (by its end e), and the stream entering block i-1 of
    the first run (i its start), where the pruned stream starts; ``(entering, i - 1, targets)``."""
    ends = {end for _, end in runs}
    first = max(runs[0][0] - 1, 0) if runs else 0
    targets: dict[int, list[torch.Tensor]] = {}
    streams = [b.x0 for b in batches]
    entering = streams
    for l in range(max(ends, default=0)):
        streams = [b.run(layers, l, h) for b, h in zip(batches, streams)]
        if l + 1 == first:
            entering = streams
        if l + 1 in ends:
            targets[l + 1] = streams
    return entering, first, targets


def _normal_equations(layers, batches: list, hidden: list, targets: list, start: int, module: nn.Module,
                      form: str) -> _Normal:
    """The least-squares problem of one run: what the fold site outputs (m) against what it should output for the
    stream after the cut to be the unpruned model's (target - x + m), over every calibration batch."""
    normal = _Normal(batches[0].x0.shape[-1], batches[0].x0.device, diagonal=form == "diagonal")
    if start == 0:
        for x0, target in zip(hidden, targets):
            normal.add(x0, target)  # x^i = m = x^0, y = 0
        return normal
    captured: list[torch.Tensor] = []  # m of the batch running, from a hook on the fold site
    handle = module.register_forward_hook(lambda mod, args, out, sink=captured: sink.append(out))
    try:
        for b, h, target in zip(batches, hidden, targets):
            captured.clear()
            x = b.run(layers, start - 1, h)
            m = captured[0]
            normal.add(m, target.to(x.device) - x + m)
    finally:
        handle.remove()
    return normal


@torch.no_grad()
def linear_repair(
    model: nn.Module,
    remove: Sequence[int],
    blocks: torch.Tensor,
    batch_size: int = 8,
    form: Form = "full",
    ridge: float = DEFAULT_RIDGE,
) -> LinearRepair:
    """Remove the blocks ``remove`` (indices of ``model``) with ``prune.prune_layers`` and fold a least-squares
    linear stand-in for each contiguous run into the weights before it, in place; the fits use packed calibration
    ``blocks`` (num_blocks, seq_len), e.g. ``packing.pack_texts(load_texts("calibration", k), tokenizer, seq_len)``.
    The model stays an ordinary one of L - n blocks; ``config.layer_repair`` records what was done
    (``LinearRepair.to_dict``), ``config.layer_pruning`` which layers went.

    ``form``: ``full`` (ReplaceMe's d x d T) or ``diagonal`` (a per-channel scale; the one exact fold for
    Gemma-2/3). ``ridge``: the solve's pull toward T = I, relative to trace(m^T m) / d. Everything that can be
    refused is refused before any weight changes (:func:`check_linear_repair`; 4-bit or offloaded weights).

    Runs under ``torch.no_grad``, not ``inference_mode``: the new weights must be ordinary tensors that a later
    heal can train around.
    """
    t0 = time.perf_counter()
    layers = decoder_layers(model)
    L = len(layers)
    drop = check_layers(remove, L)
    check_linear_repair(model.config, form, None)
    _check_inputs(blocks, batch_size, ridge)
    runs = contiguous_runs(drop)
    sites = [_fold_site(model, layers, start, form) for start, _ in runs]
    for path, module, _ in sites:
        _check_weights(module, path)
    was_training = model.training
    model.eval()
    fits: list[RunFit] = []
    tokens = 0
    try:
        batches = record(model, blocks, batch_size) if runs else []
        entering, first, targets = _full_model_streams(layers, batches, runs)
        hidden, position = entering, first  # the pruned stream entering block ``position``
        for (start, end), (path, module, kind) in zip(runs, sites):
            for l in range(position, start - 1):  # kept blocks between the previous run and this one
                hidden = [b.run(layers, l, h) for b, h in zip(batches, hidden)]
            normal = _normal_equations(layers, batches, hidden, targets[end], start, module, form)
            T = normal.solve(ridge)
            fits.append(RunFit(start, end, path, normal.error(normal.identity()), normal.error(T), T.cpu()))
            _fold(module, kind, T)
            if start == 0:
                batches = record(model, blocks, batch_size)  # x^0 through the new embedding
                hidden = [b.x0 for b in batches]
            else:
                hidden = [b.run(layers, start - 1, h) for b, h in zip(batches, hidden)]
            position = end
            tokens = normal.tokens
            del targets[end]
    finally:
        model.train(was_training)
    prune_layers(model, drop)
    report = LinearRepair(form=form, ridge=float(ridge), tokens=int(tokens), runs=fits,
                          seconds=round(time.perf_counter() - t0, 3))
    model.config.layer_repair = report.to_dict()
    return report
