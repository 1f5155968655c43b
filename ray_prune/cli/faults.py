"""What the command line says when the machine, not the input, fails: one line naming the file or the endpoint,
and the fix, instead of a traceback from deep inside pyarrow, Ray or Tune.

Only environmental faults are translated (no space, no permission, an object store that does not answer); any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Iterable

FULL = (errno.ENOSPC, errno.EDQUOT)
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)
REMOTE_MARKERS = ("AWS Error", "curlCode", "Unable to connect", "Could not connect", "ListObjectsV2", "HeadObject",
                  "google::cloud", "GCS")
NEARLY_FULL = 64 << 20  # bytes free under which a failing write is taken to be a full disk


def _chain(e: BaseException) -> Iterable[BaseException]:
    """The exception, the ones it was raised from or during, and the cause a Ray task error carries."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack += [x.__cause__, x.__context__, getattr(x, "cause", None)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _full_disk(paths: Iterable[str]) -> str | None:
    """The first of ``paths`` (or the folder it would be in) whose disk is (nearly) full."""
    for p in paths:
        path = Path(p).expanduser()
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            if shutil.disk_usage(path).free < NEARLY_FULL:
                return str(path)
        except OSError:
            continue
    return None


def explain(e: BaseException, paths: Iterable[str] = ()) -> tuple[str, str] | None:
    """(problem, fix) for an environmental fault anywhere in ``e``'s chain; None for anything else. ``paths``: where
    the command writes (the storage root, Ray's temp dir), checked for a full disk when the error itself is vague
    (Tune reports a failed state write as ``EOFError``)."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in FULL:
            where = x.filename or _full_disk(paths) or "the disk"
            return (f"no space left on {where}", "free space there, or point --storage (and RAY_TMPDIR, "
                    "RAY_PRUNE_CACHE) at a disk with room, then run the same command again")
        if isinstance(x, OSError) and x.errno in DENIED:
            return (f"cannot write {x.filename or ''}: {x.strerror}".replace("  ", " "),
                    "choose a location you can write to (--storage, --out)")
        text = str(x)
        if isinstance(x, OSError) and any(m in text for m in REMOTE_MARKERS):
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
            return (f"the object store ({endpoint}) did not answer: {_first_line(x)}",
                    "check that the endpoint is up and reachable (AWS_ENDPOINT_URL), the network and the "
                    "credentials, then run the same command again: finished rows are kept")
    full = _full_disk(paths)
    if full is not None:
        return (f"no space left on the disk holding {full} (what failed: {type(e).__name__}: {_first_line(e)})",
                "free space there, or point --storage (and RAY_TMPDIR) at a disk with room, then run the same "
                "command again")
    return None
