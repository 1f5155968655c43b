"""One sweep per storage root at a time: a lock file with a heartbeat, aged by the storage's own clock.

Two drivers on the same results would each run the same missing cells. The second one refuses with a message
naming the first. A driver killed with SIGKILL cannot remove its lock, so a lock can go stale:

- a lock whose holder was a process on this host that no longer exists is taken over at once (the usual case:
  a laptop, or a head node where ``ray job submit`` reruns the driver);
- any other lock is stale once it has not been rewritten for ``stale_after`` seconds. The age is the storage's
  own: the modification time of the lock against that of a probe written now, both stamped by the file system
  or the object store. No host's clock is compared with another's, so a live driver whose clock runs ten
  minutes behind keeps its lock.

The holder rewrites the lock every ``heartbeat`` seconds, and reads it first: a holder that finds its lock
taken by another driver stops writing it, sets :attr:`SweepLock.lost` and calls ``on_lost`` (the sweep stops).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from typing import Callable

from ray_prune.errors import UserError
from ray_prune.ledger.layout import LOCK
from ray_prune.ledger.storage import Storage


def _dead_here(holder: dict) -> bool:
    """True if the holder ran on this host and its process is gone."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by someone else
        return False
    return False


class SweepLock:
    def __init__(self, storage: Storage, stale_after: float = 600.0, heartbeat: float = 30.0,
                 on_lost: Callable[[dict], None] | None = None) -> None:
        self.storage = storage
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.on_lost = on_lost
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._beats = 0
        self.took_over: dict | None = None
        self.lost: dict | None = None  # the lock of the driver that took ours, once one did

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes(LOCK))
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        self._beats += 1
        body = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "beats": self._beats}
        self.storage.write_bytes(LOCK, json.dumps(body).encode())

    def age(self) -> float | None:
        """Seconds since the lock was last written, by the storage's clock (None: no lock)."""
        try:
            written = self.storage.mtime(LOCK)
        except FileNotFoundError:
            return None
        return max(0.0, self.storage.now() - written)

    def acquire(self) -> "SweepLock":
        holder = self._holder()
        if holder is not None and holder.get("token") != self.token:
            age = self.age()
            if age is not None and age < self.stale_after and not _dead_here(holder):
                raise UserError(
                    f"another sweep (pid {holder.get('pid')} on {holder.get('host')}) is running on "
                    f"{self.storage.uri}; its lock was written {age:.0f} s ago",
                    f"wait for it to finish, or use another --storage; a crashed sweep's lock is taken over "
                    f"once it is {self.stale_after:.0f} s old")
            self.took_over = holder
        self._write()
        if (self._holder() or {}).get("token") != self.token:  # lost a race with a driver starting at once
            raise UserError(f"another sweep started on {self.storage.uri} at the same moment",
                            "wait for it to finish, or use another --storage")
        self._thread = threading.Thread(target=self._beat, name="sweep-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                holder = self._holder()
                if holder is not None and holder.get("token") != self.token:
                    self.lost = holder  # another driver took the lock: stop writing it, and stop the sweep
                    if self.on_lost is not None:
                        self.on_lost(holder)
                    return
                self._write()
            except OSError:
                pass  # a stalled store: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lost is None and (self._holder() or {}).get("token") == self.token:
            try:
                self.storage.delete(LOCK)
            except OSError:
                pass

    def __enter__(self) -> "SweepLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
