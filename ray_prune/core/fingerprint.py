"""Fingerprints of a sweep's inputs: what a model's weights and a corpus are, cheaply, without reading them whole.

Files a sweep reuses across runs (distance tables, packed token blocks) are named by a hash of everything that
made them, so that changing any of it makes a new file instead of silently reusing a stale one. Two of those
inputs are large: a model's weights (up to 140 GB) and a corpus. Neither is hashed byte for byte:

- a local model directory: its ``config.json`` and, of every ``*.safetensors`` file, the JSON header (tensor
  names, dtypes, shapes, offsets) and the file size; rewritten weights of the same shapes change the size only
  by accident, so the file's modification time is part of it too;
- a bundled model: its hub id and the version of the package that ships it;
- a hub id: the commit the local hub cache resolves it to, where there is one, else the id as given;
- a local corpus file: its size and modification time (and its content hash when small);
- a streamed corpus: where it streams from (path, name, split, field).

Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SMALL_FILE = 64 << 20  # files up to this size are hashed whole; larger ones by size and modification time


def digest(obj: Any) -> str:
    """A short content hash of JSON-able values (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What a local file is: its size, and its sha256 when small, else its modification time."""
    p = Path(path)
    stat = p.stat()
    if stat.st_size <= SMALL_FILE:
        return {"size": stat.st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then the JSON), checked against the
    file's size: a file cut short, whose tensors end past its last byte, raises ``ValueError`` naming it."""
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{p} is {size} bytes: too short to be a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8 or length > 100 << 20:
            raise ValueError(f"{p} declares a {length}-byte header but holds {size} bytes: truncated or not "
                             "safetensors")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p} has an unreadable safetensors header ({e})") from None
    end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise ValueError(f"{p} holds {size} bytes but its tensors end at byte {8 + length + end}: the file is "
                         "truncated")
    return header


def model_identity(name: str) -> dict[str, Any]:
    """What the weights of a bundled name, a local directory or a hub id are (see the module docstring)."""
    from ray_prune.core.bundled import BUNDLED

    if name in BUNDLED:
        b = BUNDLED[name]
        try:
            shipped = version(b.package.replace("_", "-"))
        except PackageNotFoundError:
            shipped = "unknown"
        return {"bundled": name, "hub_id": b.hub_id, "package_version": shipped}
    local = Path(name).expanduser()
    if local.is_dir():
        files = {}
        for f in sorted(local.glob("*.safetensors")):
            stat = f.stat()
            files[f.name] = {"header": digest(safetensors_header(f)), "size": stat.st_size,
                             "mtime_ns": stat.st_mtime_ns}
        config = local / "config.json"
        return {"local": str(local.resolve()), "config": digest(config.read_text()) if config.is_file() else None,
                "weights": files}
    return {"hub": name, "revision": _cached_revision(name)}


def _cached_revision(repo_id: str) -> str | None:
    """The commit the local hub cache resolves ``repo_id``'s main branch to, if it holds one."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return None
    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / "main"
    return ref.read_text().strip() if ref.is_file() else None


def check_weights(directory: str | os.PathLike, fix: str | None = None) -> None:
    """Every safetensors file of a local model directory is whole, from its header alone (no weight is read):
    a truncated file fails here, naming itself, instead of deep inside a model load."""
    from ray_prune.errors import UserError

    for f in sorted(Path(directory).glob("*.safetensors")):
        try:
            safetensors_header(f)
        except (OSError, ValueError) as e:
            raise UserError(str(e), fix or f"re-download or re-save the model (save_pretrained) so that {f.name} "
                            "is whole") from None
