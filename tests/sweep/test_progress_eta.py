"""The live view's time left counts trial work only: a long stage 1 before the first trial does not inflate it."""

from __future__ import annotations

import time

import pytest

from ray_prune.sweep.progress import ProgressView


def test_time_left_runs_from_the_first_trial_not_from_the_start_of_stage_1():
    view = ProgressView({"m": 4}, enabled=False, costs={"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0})
    now = time.monotonic()
    view.t0 = now - 1000.0  # a 1000-s stage 1 before any trial
    assert view.eta() is None  # no work done yet: no estimate
    view.started = {"t1": now - 100.0, "t2": now - 60.0}
    view.progress = {"a": 1.0, "b": 1.0}  # half the planned trial work done in the 100 s since the first start
    assert view.eta() == pytest.approx(100.0, rel=0.05)


def test_without_a_started_trial_the_sweep_start_is_the_clock():
    view = ProgressView({"m": 2}, enabled=False)
    view.t0 = time.monotonic() - 50.0
    view.progress = {"a": 1.0}
    assert view.eta() == pytest.approx(50.0, rel=0.05)
