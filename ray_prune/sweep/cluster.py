"""Where a sweep runs: connecting to Ray, and what each trial may ask of the cluster.

A trial that asks for a GPU on a cluster that has none (and never will) stays
PENDING forever, so requests are checked against the cluster before Tune starts.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray_prune.errors import UserError
from ray_prune.sweep.experiment import Experiment


def connect(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """``RAY_ADDRESS`` if set (a cluster, or ``ray job submit``'s), else a fresh embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING, include_dashboard=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, logging_level=logging.WARNING)
    else:
        # address="local": always a fresh embedded Ray, even where a `ray start` cluster runs on this machine
        # (attaching to it would reject num_cpus); clusters are reached through RAY_ADDRESS above.
        auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
        auth.addFilter(_quiet_default_auth)
        try:
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), num_gpus=num_gpus, **kwargs)
        finally:
            auth.removeFilter(_quiet_default_auth)


def _quiet_default_auth(record: logging.LogRecord) -> bool:
    """Drop Ray's notice that token authentication is on (its safe default) for the embedded Ray a sweep starts
    and stops itself: a first run's output should say what runs, not how Ray secures a private instance. The
    warning that authentication is *off* still shows."""
    return not record.getMessage().startswith("Token authentication is enabled")


def trial_resources(exp: Experiment) -> tuple[float, int]:
    """(GPUs, CPUs) per trial, refusing a request that this cluster can never satisfy."""
    import ray

    total = ray.cluster_resources()
    gpus_total, cpus_total = total.get("GPU", 0.0), int(total.get("CPU", 1))
    want = exp.resources.gpus_per_trial
    # auto: a GPU per trial where GPUs exist or an autoscaler will add them (clusters start at zero workers)
    gpus = (1.0 if gpus_total >= 1 or exp.resources.autoscaling else 0.0) if want == "auto" else float(want)
    if gpus > gpus_total and not exp.resources.autoscaling:
        raise UserError(
            f"each trial asks for {gpus:g} GPU but the Ray cluster has {gpus_total:g}; "
            "the trials would wait forever", "set resources.gpus_per_trial: 0 (or auto), connect to a GPU cluster, "
            "or set resources.autoscaling: true if GPU nodes are added on demand")
    if exp.resources.cpus_per_trial == "auto":
        per = cpus_total if gpus == 0 else max(1, cpus_total // max(1, int(gpus_total or 1)))
        cpus = max(1, min(per, 8 if gpus else cpus_total))
    else:
        cpus = int(exp.resources.cpus_per_trial)
    if cpus > cpus_total and not exp.resources.autoscaling:
        raise UserError(f"each trial asks for {cpus} CPUs but the Ray cluster has {cpus_total}",
                        "lower resources.cpus_per_trial or use auto")
    return gpus, cpus


def probe_gpu_memory_gb() -> float | None:
    """The memory of one of the cluster's GPUs (None when it has none up), read by a one-GPU task."""
    import ray

    if ray.cluster_resources().get("GPU", 0) < 1:
        return None

    def total() -> float:
        import torch

        return torch.cuda.get_device_properties(0).total_memory / 2**30

    return float(ray.get(ray.remote(num_gpus=1)(total).remote()))
