"""One sweep per storage root at a time: a lock file with a heartbeat.

Two drivers on the same results would each run the same missing cells. The
second one refuses with a message naming the first. A driver killed with
SIGKILL cannot remove its lock: a lock whose holder was a process on this
host that no longer exists is taken over at once (the usual case: a laptop,
or a head node where ``ray job submit`` reruns the driver), and any other lock
whose heartbeat is older than ``stale_after`` seconds is taken over too.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

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
    def __init__(self, storage: Storage, stale_after: float = 600.0, heartbeat: float = 30.0) -> None:
        self.storage = storage
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.storage.read_bytes(LOCK))
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        body = {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "beat": time.time()}
        self.storage.write_bytes(LOCK, json.dumps(body).encode())

    def acquire(self) -> "SweepLock":
        holder = self._holder()
        if holder is not None:
            age = time.time() - float(holder.get("beat", 0))
            if age < self.stale_after and not _dead_here(holder):
                raise UserError(
                    f"another sweep (pid {holder.get('pid')} on {holder.get('host')}) is running on "
                    f"{self.storage.uri}; its heartbeat is {age:.0f} s old",
                    f"wait for it to finish, or use another --storage; a crashed sweep's lock is taken over "
                    f"after {self.stale_after:.0f} s")
            self.took_over = holder
        self._write()
        time.sleep(0.05)
        if (self._holder() or {}).get("token") != self.token:  # lost a race with a driver starting at once
            raise UserError(f"another sweep started on {self.storage.uri} at the same moment",
                            "wait for it to finish, or use another --storage")
        self._thread = threading.Thread(target=self._beat, name="sweep-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self._write()
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (self._holder() or {}).get("token") == self.token:
            try:
                self.storage.delete(LOCK)
            except OSError:
                pass

    def __enter__(self) -> "SweepLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
