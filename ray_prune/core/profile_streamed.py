"""Profile a model larger than the memory at hand, one decoder block at a time, straight from its safetensors.

The table is the one ``ray_prune.core.profile.profile`` computes, by the same
reduction and the same pair distances, in another order: the calibration
activations of *all* batches pass through block l, are reduced, and block l is
freed before block l+1 is read from its shard. Peak memory is about one block,
the activations of the calibration set, and the embedding (freed before the
first block loads).

How, with no per-family code:

1. The model skeleton is built from its config under
   ``accelerate.init_empty_weights(include_buffers=False)``: parameters on the
   meta device, buffers (rotary ``inv_freq``, Gemma's ``embed_scale``) real.
2. Only the decoder's tensors outside its blocks are read (the embedding,
   rotary buffers; not the final norm, never needed, nor the LM head).
3. Each block is replaced by a recorder that keeps the ``(args, kwargs)`` the
   decoder passes it (attention masks, position ids, position embeddings per
   layer type) and returns its input; one decoder pass per batch gives x^0 and
   every block's arguments, which do not depend on the hidden states. They are
   kept by reference: the decoder passes the same tensors to every block.
4. For l = 0..L-1: block l is materialised from its shard tensors, every batch
   runs through it with its recorded arguments, the output is reduced, and
   the block goes back to the meta device.

The reduced vectors of every stream are kept until the end (the Gram product
needs each pair): B x (L+1) x H floats for ``angular``, but (L+1) times the
activations for the all-token metrics.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ray_prune.core import dtypes
from ray_prune.core.calibration import DEFAULT
from ray_prune.core.architecture import decoder, decoder_layers, family_of
from ray_prune.core.distance import DistanceTable, Metric
from ray_prune.core.models import default_device, resolve
from ray_prune.core.profile import (block_output, check_inputs, encode, length_sorted_batches, make_table,
                                    pair_distances, reduce_stream, run_decoder, selector)
from ray_prune.errors import UserError

INDEX_FILE = "model.safetensors.index.json"


def local_dir(model: str) -> Path:
    """A bundled name, a local directory, or a hub id (only its ``*.safetensors`` and ``*.json`` downloaded)."""
    resolved = resolve(model)
    path = Path(resolved)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:  # offline, unknown repo, gated repo: all are the user's to fix
        raise UserError(f"could not download {model!r}: {e}".splitlines()[0],
                        "check the hub id, your network or HF_TOKEN, or pass a local directory") from e


class Shards:
    """Where each tensor of a safetensors checkpoint lives, and reading a module's tensors out of it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX_FILE
        if index.is_file():
            self.files = {k: directory / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            self.files = {}
            for file in sorted(directory.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), file))
        if not self.files:
            raise UserError(f"no safetensors weights in {directory}",
                            "streamed profiling reads safetensors shards: re-save the model with "
                            "save_pretrained(dir) (safetensors is its default), or use `profile` on a loaded model")
        self.aliases: dict[str, str] = {}  # a tied tensor that the checkpoint stores only under its partner's name
        self.base_prefix = ""

    def key(self, name: str) -> str | None:
        """The checkpoint key of the skeleton's tensor ``name``: as is, without the base-model prefix
        (a checkpoint of the bare decoder), or under its tied partner's name."""
        for candidate in (name, self.aliases.get(name)):
            if candidate is None:
                continue
            if candidate in self.files:
                return candidate
            bare = candidate.removeprefix(self.base_prefix)
            if bare in self.files:
                return bare
        return None

    def require(self, names: Sequence[str]) -> None:
        """Fail before any work if the checkpoint lacks a tensor the profile needs."""
        missing = [n for n in names if self.key(n) is None]
        if missing:
            raise UserError(f"{self.directory} has no tensor {', '.join(missing[:3])}"
                            + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""),
                            "point at a checkpoint of this config, written by save_pretrained")

    def load(self, net: nn.Module, path: str, device: torch.device, skip: Sequence[str] = ()) -> None:
        """Materialise every parameter (and stored buffer) of ``net.<path>`` on ``device``, but those under
        ``skip``; buffers the checkpoint lacks (computed at build time) just move to ``device``."""
        from accelerate.utils import set_module_tensor_to_device
        from safetensors import safe_open

        module = net.get_submodule(path)
        full = f"{path}." if path else ""
        wanted: dict[Path, list[tuple[str, str]]] = {}
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if any(name == s or name.startswith(s + ".") for s in skip):
                continue
            key = self.key(full + name)
            if key is None:
                if isinstance(tensor, nn.Parameter):
                    self.require([full + name])
                set_module_tensor_to_device(module, name, device, clear_cache=False)
                continue
            wanted.setdefault(self.files[key], []).append((name, key))
        for file, items in wanted.items():
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for name, key in items:
                    set_module_tensor_to_device(module, name, device, value=f.get_tensor(key), clear_cache=False)


def release(module: nn.Module) -> None:
    """Send a module's parameters back to the meta device, freeing their memory."""
    for name, p in list(module.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner)
        holder._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)


class _StopDecoder(Exception):
    """Raised by the last recorder: nothing after the blocks (the final norm) is needed."""


class _Recorder(nn.Module):
    """Stands in for a block: keeps the arguments the decoder passes it (and, for the first, its input x^0)
    and returns its input."""

    def __init__(self, calls: list, inputs: list | None, last: bool) -> None:
        super().__init__()
        self.calls, self.inputs, self.last = calls, inputs, last

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.calls.append((args[1:], kwargs))
        if self.inputs is not None:
            self.inputs.append(hidden)
        if self.last:
            raise _StopDecoder
        return hidden


def _call_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    return block_output(block(hidden, *args, **kwargs))


def _config(directory: Path, trust_remote_code: bool):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    family_of(config)  # a clear error on families we cannot profile, before any weight is read
    return config


def _skeleton(config, torch_dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The CausalLM with every parameter on the meta device and its buffers real."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        net = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return net.eval()


def _tied_aliases(net: nn.Module) -> dict[str, str]:
    """Input embedding weight -> output embedding weight (and back) when the config ties them."""
    text_config = getattr(net.config, "get_text_config", lambda: net.config)()
    if not getattr(text_config, "tie_word_embeddings", False):
        return {}
    names = {id(m): n for n, m in net.named_modules()}
    inp, out = net.get_input_embeddings(), net.get_output_embeddings()
    if inp is None or out is None or id(inp) not in names or id(out) not in names:
        return {}
    a, b = f"{names[id(inp)]}.weight", f"{names[id(out)]}.weight"
    return {a: b, b: a}


def _module_path(net: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in net.named_modules() if m is module)


def _record(body: nn.Module, layers: nn.ModuleList, batches: list[tuple[torch.Tensor, torch.Tensor]]):
    """One decoder pass per batch with recorders in place of the blocks: x^0 of each batch, and
    ``calls[l][b]``, the (args, kwargs) the decoder passed block l for batch b."""
    blocks = list(layers)
    L = len(blocks)
    calls: list[list] = [[] for _ in range(L)]
    inputs: list[torch.Tensor] = []
    for l in range(L):
        layers[l] = _Recorder(calls[l], inputs if l == 0 else None, l == L - 1)
    try:
        for b, (ids, mask) in enumerate(batches):
            try:
                run_decoder(body, ids, mask)
            except _StopDecoder:
                pass
            if any(len(c) != b + 1 for c in calls):
                raise RuntimeError(f"the decoder {type(body).__name__} did not call each of its {L} blocks once")
    finally:
        for l, block in enumerate(blocks):
            layers[l] = block
    return inputs, calls


@torch.inference_mode()
def profile_streamed(
    model: str,
    tokenizer,
    texts: Sequence[str],
    metric: Metric = DEFAULT.metric,  # type: ignore[assignment]
    batch_size: int = DEFAULT.batch_size,
    max_length: int = DEFAULT.max_length,
    dtype: str = "fp32",
    device: str | torch.device | None = None,
    model_id: str | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> DistanceTable:
    """The distance table of ``model`` (bundled name, local directory or hub id) on ``texts``, the same as
    ``profile`` computes, holding one block in memory at a time."""
    check_inputs(metric, texts, batch_size, max_length)
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # safetensors reads straight onto a numbered GPU
    torch_dtype = dtypes.to_torch(dtype, dev, "inference")
    directory = local_dir(model)
    config = _config(directory, trust_remote_code)
    shards = Shards(directory)
    net = _skeleton(config, torch_dtype, trust_remote_code)
    shards.aliases = _tied_aliases(net)
    shards.base_prefix = f"{net.base_model_prefix}." if getattr(net, "base_model_prefix", "") else ""
    _, family = family_of(net)
    layers, body = decoder_layers(net), decoder(net)
    L = len(layers)
    body_path, layers_path = _module_path(net, body), _module_path(net, layers)
    t0 = time.perf_counter()

    # The decoder outside its blocks, but the final norm: x^L is taken before it. Freed once x^0 is known.
    inside = f"{body_path}." if body_path else ""
    shards.require([n for n, _ in net.named_parameters()
                    if n.startswith(inside) and not n.startswith(f"{family.final_norm_path}.")])
    shards.load(net, body_path, dev, skip=[p.removeprefix(inside) for p in (layers_path, family.final_norm_path)])
    batches = [encode(tokenizer, texts, idx, max_length, dev) for idx in length_sorted_batches(texts, batch_size)]
    hidden, calls = _record(body, layers, batches)
    release(body)
    selects = [selector(mask, metric) for _, mask in batches]
    samples, tokens = len(texts), sum(int(mask.sum()) for _, mask in batches)
    del batches

    from tqdm.auto import tqdm

    vectors = [[reduce_stream(h, s, metric)] for h, s in zip(hidden, selects)]  # vectors[b][l]: x^l of batch b
    for l in tqdm(range(L), desc="profile (streamed)", disable=not progress, unit="block"):
        shards.load(net, f"{layers_path}.{l}", dev)
        for b, (args, kwargs) in enumerate(calls[l]):
            hidden[b] = _call_block(layers[l], hidden[b], args, kwargs)
            vectors[b].append(reduce_stream(hidden[b], selects[b], metric))
        release(layers[l])
        calls[l] = None
    total = torch.zeros(L + 1, L + 1, dtype=torch.float64, device=dev)
    for v in vectors:  # batch by batch, in the order profile() sums them
        total += pair_distances(torch.stack(v, dim=1), metric)
    name = model_id or getattr(net.config, "_name_or_path", "") or model
    return make_table(total, samples, tokens, metric, L, name, tokenizer, texts, max_length,
                      extra={"dtype": str(torch_dtype), "device": str(dev), "streamed": True,
                             "seconds": round(time.perf_counter() - t0, 3)})
