"""One sweep per storage root: the lock refuses a second driver, ages by the storage's clock (never by comparing
two hosts' clocks), is taken over when its holder is gone, and a holder whose lock was taken stops writing."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time

import pytest

from ray_prune.errors import UserError
from ray_prune.ledger.layout import LOCK
from ray_prune.ledger.storage import Storage
from ray_prune.sweep.lock import SweepLock


def _plant(path, **holder) -> None:
    (path / LOCK).write_text(json.dumps({"token": "other", "host": "another-host", "pid": 4242, **holder}))


def test_a_second_sweep_is_refused_and_the_lock_released(tmp_path):
    s = Storage(str(tmp_path))
    with SweepLock(s, heartbeat=0.1):
        with pytest.raises(UserError, match="another sweep .* is running"):
            SweepLock(s).acquire()
    assert not (tmp_path / LOCK).exists()  # released


def test_a_live_holder_with_a_clock_far_behind_keeps_its_lock(tmp_path, monkeypatch):
    """The old lock compared the holder's clock (in the file) with the reader's: a holder 20 minutes behind looked
    dead. The age is now the storage's: the lock file's modification time against a probe written now."""
    s = Storage(str(tmp_path))
    _plant(tmp_path, beat=time.time() - 1200)  # what a writer 20 minutes behind would have written
    monkeypatch.setattr(time, "time", lambda: 1e12)  # and the reader's own clock far ahead: neither is read
    with pytest.raises(UserError, match=r"another sweep \(pid 4242 on another-host\) is running"):
        SweepLock(s, stale_after=600).acquire()


def test_a_lock_not_rewritten_for_the_timeout_is_taken_over(tmp_path):
    s = Storage(str(tmp_path))
    _plant(tmp_path)
    with pytest.raises(UserError):
        SweepLock(s, stale_after=1.0).acquire()
    time.sleep(1.3)  # by the file system's clock, the lock is now older than stale_after
    lock = SweepLock(s, stale_after=1.0).acquire()
    assert lock.took_over["token"] == "other"
    lock.release()


def test_a_dead_process_of_this_host_loses_its_lock_at_once_a_live_one_keeps_it(tmp_path):
    s = Storage(str(tmp_path))
    gone = subprocess.Popen(["true"])
    gone.wait()
    _plant(tmp_path, host=socket.gethostname(), pid=gone.pid, token="killed")
    lock = SweepLock(s, stale_after=600).acquire()
    assert lock.took_over["token"] == "killed"
    lock.release()
    _plant(tmp_path, host=socket.gethostname(), pid=os.getppid(), token="alive")
    with pytest.raises(UserError, match="another sweep"):
        SweepLock(s, stale_after=600).acquire()


def test_a_holder_whose_lock_is_taken_stops_writing_it_and_is_told(tmp_path):
    s = Storage(str(tmp_path))
    told = threading.Event()
    lock = SweepLock(s, heartbeat=0.1, on_lost=lambda holder: told.set()).acquire()
    _plant(tmp_path, token="thief")
    assert told.wait(5), "the holder did not notice"
    assert lock.lost["token"] == "thief"
    time.sleep(0.3)
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "thief"  # it stopped writing the lock
    lock.release()
    assert (tmp_path / LOCK).exists()  # and leaves the other driver's lock alone on the way out
