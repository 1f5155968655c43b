"""Write a file or a folder so that a reader sees the whole of it or nothing: the one atomic write on a local disk.

Every local writer goes through :func:`atomic_path`: the content is written under a hidden temporary name beside
the target (same file system, so the rename is atomic), flushed to disk, then renamed into place; on any error,
Ctrl-C included, the temporary is removed and the target is left as it was. Temporaries are created with
``open(..., "x")`` and ``mkdir``, which honour the user's umask, so what lands has the permissions the user's
other files have (``tempfile.mkstemp``/``mkdtemp`` would give 0600 and 0700, unreadable to colleagues on a
shared machine). Object stores need none of this: they publish an object only once its upload completes
(``ledger.storage``). Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

TMP_PREFIX = "."  # temporaries are hidden: listings skip them, so a half-written file is never read
TMP_SUFFIX = ".tmp"


def temp_name(target: Path) -> Path:
    """A hidden, unique name beside ``target``."""
    return target.with_name(f"{TMP_PREFIX}{target.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status``), else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _usual_modes(folder: Path) -> None:
    """What a library wrote into a folder with ``mkstemp`` (0600) gets the user's usual permissions: a colleague
    on a shared machine can read a model this user saved."""
    mask = umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _fsync(path: Path) -> None:
    if path.is_file():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, directory: bool = False, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``target``'s content to; it becomes ``target`` when the block succeeds.

    ``directory``: the temporary is an empty folder (for ``save_pretrained`` and the like); an existing target
    folder is swapped out and removed. ``replace=False`` refuses (FileExistsError) to replace an existing target.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    if directory:
        tmp.mkdir()
    else:
        tmp.touch(exist_ok=False)
    try:
        yield tmp
        if not replace and target.exists():
            raise FileExistsError(f"{target} exists")
        if directory:
            _usual_modes(tmp)
            for child in tmp.rglob("*"):
                _fsync(child)
            if target.exists():
                old = temp_name(target)
                os.replace(target, old)
                os.replace(tmp, target)
                _remove(old)
            else:
                os.replace(tmp, target)
        else:
            _fsync(tmp)
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            _remove(tmp)


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """``target`` holds ``data``, written atomically; returns its path."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Temporaries under ``folder`` left by writers that died mid-write (safe to delete only where no writer runs)."""
    root = Path(folder)
    if not root.is_dir():
        return []
    return [p for p in root.rglob(f"{TMP_PREFIX}*{TMP_SUFFIX}")]
