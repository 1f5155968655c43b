"""Ray Jobs, for real: a sweep submitted with ``ray job submit`` to a real ``ray start --head``, as
``clusters/README.md`` says, with Ray's token authentication on.

The module's head is its own: every port chosen here, its temp dir under pytest's, its own ``HOME`` (where
``ray get-auth-token --generate`` writes the token: never the user's ``~/.ray/auth_token``). It is stopped
by the process ids of what it started, never with ``ray stop``, which would stop every Ray on the machine.

The jobs run ``ray job submit --address http://127.0.0.1:<port> --working-dir . -- ray-prune sweep <yaml>
--storage <dir>`` from the repository root. The experiment file, the tiny models and the storage are
absolute paths under pytest's temp dir: the head runs on this machine, so the job sees them where the test
wrote them, and the test never writes into the checkout it uploads (which other people edit). On a real
cluster the YAML is inside the working dir (``experiments/``, uploaded with it) and models and storage are
hub ids and ``s3://``/``gs://`` URIs every node can reach.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest

from faults import FAULT_ENV, KILL_ENV, KILL_ONCE_ENV, SITE_DIR
from helpers import REPO, save_tiny_models, tiny_spec
from ray_prune.core import provenance
from ray_prune.ledger.rows import load_results
from ray_prune.sweep.experiment import parse_experiment
from sweep.drivers import expected_rows

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
# Columns that measure time or say when: the only ones a rerun of the same cell may change.
TIMING = {"wall_s", "load_s", "heal_s", "eval_s", "profile_s", "gpu_s", "finished_at"}
# Variables of the caller that must not reach the head or the clients: each is set explicitly below.
NOT_INHERITED = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                 "PYTHONPATH", FAULT_ENV, KILL_ENV, KILL_ONCE_ENV}
SOCKET_PATH_MAX = 107  # bytes of a Unix socket path; Ray's sockets live in <temp dir>/session_<time>_<pid>/sockets/


@dataclass
class Head:
    address: str  # the Jobs server (the dashboard's HTTP port)
    token: str
    client_env: dict[str, str]  # a client that has the token: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH
    root: Path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _worker_ports(size: int = 100) -> tuple[int, int]:
    """A free range below the kernel's ephemeral ports (32768+), so no port picked by the OS falls in it."""
    for _ in range(50):
        lo = random.randrange(10000, 32000 - size)
        try:
            for port in range(lo, lo + size):
                with socket.socket() as s:
                    s.bind(("", port))
            return lo, lo + size - 1
        except OSError:
            continue
    raise RuntimeError("no free range of worker ports")


def _ray_temp_dir(tmp_path_factory) -> tuple[Path, bool]:
    """pytest's temp dir if Ray's socket paths fit under it, else a short one in /tmp (which we then remove)."""
    path = tmp_path_factory.mktemp("ray")
    longest = len(str(path)) + len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
    if longest <= SOCKET_PATH_MAX:
        return path, False
    return Path(tempfile.mkdtemp(prefix="rp-ray-", dir="/tmp")), True


def _file_state(path: Path):
    return (path.read_bytes(), path.stat().st_mtime_ns) if path.exists() else None


def _api(head: Head, route: str, token: str | None = "") -> tuple[int, str]:
    """GET a Jobs-server route, with the head's token (default), another token, or none (None)."""
    req = urllib.request.Request(f"{head.address}{route}")
    token = head.token if token == "" else token
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _head_processes(ray_start: int, temp_dir: Path) -> dict[int, psutil.Process]:
    """This head's processes: the descendants of its ``ray start --block`` and any process naming its temp dir
    (one whose parent died before it)."""
    procs: dict[int, psutil.Process] = {}
    try:
        procs.update({p.pid: p for p in psutil.Process(ray_start).children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        if str(temp_dir) in " ".join(p.info["cmdline"] or []):
            procs[p.pid] = p
    procs.pop(os.getpid(), None)
    return procs


def _other_rays() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.process_iter(["name"]) if p.info["name"] in ("gcs_server", "raylet")}


def _stop_head(proc: subprocess.Popen, temp_dir: Path, others: dict[int, psutil.Process]) -> None:
    ours = _head_processes(proc.pid, temp_dir)
    still_there = {pid for pid, p in others.items() if p.is_running()}
    assert not set(ours) & still_there, "the head's process list names another Ray's process"
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` drains its node, then stops what it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    _, alive = psutil.wait_procs(list(ours.values()), timeout=30)
    for p in alive:
        try:
            p.kill()  # psutil refuses if the pid was reused by another process meanwhile
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=10)
    assert not alive, f"processes of the head outlived it: {alive}"
    assert not _head_processes(proc.pid, temp_dir), "a process of the head is still running"


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayjobs")
    temp_dir, remove_temp_dir = _ray_temp_dir(tmp_path_factory)
    head_home, client_home = root / "head-home", root / "client-home"
    head_home.mkdir()
    client_home.mkdir()
    users_token = Path.home() / ".ray" / "auth_token"
    users_token_before = _file_state(users_token)

    base = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"  # `ray` and `ray-prune` of this venv
    # The token, by Ray's own generator: it writes $HOME/.ray/auth_token, here the head's HOME.
    gen = subprocess.run([RAY, "get-auth-token", "--generate"], env={**base, "HOME": str(head_home)},
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    token_file = head_home / ".ray" / "auth_token"
    token = token_file.read_text()
    assert gen.stdout == token and len(token) == 64 and set(token) <= set("0123456789abcdef")
    client_token = root / "client-token"  # a remote client keeps its copy anywhere, named by RAY_AUTH_TOKEN_PATH
    client_token.write_text(token)
    client_token.chmod(0o600)

    gcs, dashboard, client, metrics, agent, agent_grpc, env_agent, node_manager, object_manager = _free_ports(9)
    lo, hi = _worker_ports()
    cmd = [RAY, "start", "--head", "--block", "--port", gcs, "--dashboard-host", "127.0.0.1",
           "--dashboard-port", dashboard, "--include-dashboard", "true", "--num-cpus", 2, "--num-gpus", 0,
           "--ray-client-server-port", client, "--metrics-export-port", metrics,
           "--dashboard-agent-listen-port", agent, "--dashboard-agent-grpc-port", agent_grpc,
           "--runtime-env-agent-port", env_agent, "--node-manager-port", node_manager,
           "--object-manager-port", object_manager, "--min-worker-port", lo, "--max-worker-port", hi,
           "--object-store-memory", 300 * 2**20, "--temp-dir", temp_dir, "--disable-usage-stats"]
    others = _other_rays()
    log = open(root / "head.log", "wb")
    proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**base, "HOME": str(head_home), "RAY_AUTH_MODE": "token"})
    h = Head(f"http://127.0.0.1:{dashboard}", token,
             {**base, "HOME": str(client_home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(client_token)},
             root)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (root / "head.log").read_text()[-3000:]
            # `ray start` writes the address file (in its own temp dir, not /tmp/ray) once the node is up.
            try:
                if (temp_dir / "ray_current_cluster").is_file() and _api(h, "/api/jobs/")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, "the head and its Jobs server did not come up"
            time.sleep(0.5)
        yield h
    finally:
        try:
            _stop_head(proc, temp_dir, others)
        finally:
            log.close()
            if remove_temp_dir:
                shutil.rmtree(temp_dir, ignore_errors=True)
        assert _file_state(users_token) == users_token_before, "the user's ~/.ray/auth_token was touched"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tokenizer):
    return save_tiny_models(tmp_path_factory.mktemp("models"), ["tiny-llama", "tiny-faulty"], tokenizer)


def _submit(head: Head, spec: dict, storage: Path | str, runtime_env: dict | None = None, spec_dir: Path | None = None):
    """``ray job submit ... --working-dir . -- ray-prune sweep`` from the repository root; waits for the end."""
    path = (spec_dir or Path(storage).parent) / f"{spec['name']}.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    job_id = f"ray-prune-{spec['name']}-{os.getpid()}-{int(time.time())}"
    cmd = [RAY, "job", "submit", "--address", head.address, "--submission-id", job_id, "--working-dir", "."]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(runtime_env)]
    cmd += ["--", "ray-prune", "sweep", str(path), "--storage", str(storage)]
    t = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=head.client_env, capture_output=True, text=True, timeout=480)
    wall = time.monotonic() - t
    code, body = _api(head, f"/api/jobs/{job_id}")
    assert code == 200, body
    return r.returncode, r.stdout + r.stderr, json.loads(body), wall, path


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _same(a, b) -> bool:
    """Equal values of one cell: lists element-wise, floats to 1e-9 (both runs use one thread per trial)."""
    if isinstance(a, (list, tuple, np.ndarray)) and isinstance(b, (list, tuple, np.ndarray)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def test_the_jobs_server_refuses_clients_without_the_token(head):
    assert _api(head, "/api/jobs/", token=None)[0] == 401
    assert _api(head, "/api/jobs/", token="0" * 64)[0] == 403
    # `ray job submit`/`list` send the token only with RAY_AUTH_MODE=token, whatever token file they could read.
    no_mode = {k: v for k, v in head.client_env.items() if k != "RAY_AUTH_MODE"}
    r = subprocess.run([RAY, "job", "list", "--address", head.address], env=no_mode, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "Authentication required" in r.stdout + r.stderr
    r = subprocess.run([RAY, "job", "list", "--address", head.address], env=head.client_env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_submitted_sweep_succeeds_with_the_rows_of_a_local_run(head, models_dir, tmp_path):
    spec = tiny_spec(name="jobs", models=[str(models_dir / "tiny-llama")], fractions=[0.5])  # 2 cells
    exp = parse_experiment(spec)
    # The uploaded copy has no .git: the submitter names the commit it runs, as the README shows.
    commit = {"env_vars": {provenance.CODE_VERSION_ENV: provenance.code_version()}}
    rc, out, info, wall, path = _submit(head, spec, tmp_path / "job-store", commit)
    print(f"\n[ray jobs] submitted sweep of 2 cells: {info['status']} in {wall:.1f} s")
    assert rc == 0 and info["status"] == "SUCCEEDED", out[-4000:]
    assert info.get("driver_exit_code") in (0, None)
    assert info["runtime_env"]["working_dir"].startswith("gcs://"), "the checkout was uploaded with the job"
    assert "2 cells, 0 already done, 2 to run" in out  # the driver's own output, streamed back by submit
    job = load_results(str(tmp_path / "job-store"))

    # The same experiment run locally (its own embedded Ray, as on a laptop) into another storage.
    home = tmp_path / "local-home"  # ray.init() writes its token under $HOME/.ray: not the user's
    home.mkdir()
    env = {**{k: v for k, v in os.environ.items() if k not in NOT_INHERITED}, "HOME": str(home)}
    t = time.monotonic()
    local_run = subprocess.run([sys.executable, "-m", "ray_prune.cli", "sweep", str(path), "--storage",
                                str(tmp_path / "local-store"), "--quiet"], cwd=REPO, env=env, capture_output=True,
                               text=True, timeout=480)
    print(f"[ray jobs] the same sweep run locally: {time.monotonic() - t:.1f} s")
    assert local_run.returncode == 0, local_run.stdout[-3000:] + local_run.stderr[-3000:]
    local = load_results(str(tmp_path / "local-store"))

    want = expected_rows(exp)
    for df in (job, local):
        assert df.attrs["corrupt_files"] == [] and set(df["status"]) == {"finished"}
        assert sorted(zip(df["cell_id"], df["stage"])) == sorted(want)
    job, local = (df.set_index(["cell_id", "stage"]).sort_index() for df in (job, local))
    compared = [c for c in job.columns if c not in TIMING]
    assert set(compared) == {c for c in local.columns if c not in TIMING}
    differ = [(key, c, job.at[key, c], local.at[key, c]) for key in job.index for c in compared
              if not _same(job.at[key, c], local.at[key, c])]
    assert not differ, differ[:10]
    assert job["c4_loss"].notna().all() and job["boolq_acc"].notna().all()
    print(f"[ray jobs] {len(job)} rows, {len(compared)} columns each, identical to the local run")


def test_a_submitted_sweep_whose_cell_fails_for_good_ends_failed_with_the_failed_row(head, models_dir, tmp_path):
    spec = tiny_spec(name="jobs-fail", models=[str(models_dir / "tiny-faulty")], fractions=[0.5],
                     strategies=["deepest"], resources={"cpus_per_trial": 1, "max_failures": 0})
    # The fault reaches the job's driver and its Ray workers only through the job's runtime env.
    runtime_env = {"env_vars": {FAULT_ENV: "faulty:heal", "PYTHONPATH": SITE_DIR}}
    rc, out, info, wall, _ = _submit(head, spec, tmp_path / "store", runtime_env)
    print(f"\n[ray jobs] submitted sweep with a failing cell: {info['status']} in {wall:.1f} s")
    assert rc == 1 and info["status"] == "FAILED", out[-4000:]
    assert "exit code 1" in info["message"]
    assert info["runtime_env"]["env_vars"][FAULT_ENV] == "faulty:heal"
    df = load_results(str(tmp_path / "store"))
    healed = df[df["stage"] == "healed"]
    assert len(healed) == 1 and healed["status"].iloc[0] == "failed", healed
    assert "injected fault in heal" in healed["error"].iloc[0] and healed["attempts"].iloc[0] == 1
    others = df[df["stage"] != "healed"]
    assert sorted(others["stage"]) == ["baseline", "unhealed"] and set(others["status"]) == {"finished"}


def test_a_submitted_sweep_with_a_relative_storage_is_refused_before_anything_runs(head, models_dir, tmp_path):
    """Under ``ray job submit`` a relative path would land in Ray's temporary copy of the working directory and go
    with the session; the sweep refuses it, naming the fix, before it starts anything."""
    spec = tiny_spec(name="jobs-relative", models=[str(models_dir / "tiny-llama")], fractions=[0.5])
    rc, out, info, wall, _ = _submit(head, spec, "results/jobs-relative", spec_dir=tmp_path)
    print(f"\n[ray jobs] relative storage: {info['status']} in {wall:.1f} s")
    assert rc != 0 and info["status"] == "FAILED", out[-4000:]
    assert "'results/jobs-relative' is a relative path, and this sweep runs as a Ray job" in out
    assert "fix: pass --storage with an absolute path" in out and "Traceback" not in out
    assert "stage 1" not in out  # refused before anything ran
    assert not (REPO / "results" / "jobs-relative").exists()
