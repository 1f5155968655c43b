"""Sweeps on object storage, for real: every test talks S3 to moto's standalone server on 127.0.0.1.

A user points ray-prune at any S3-compatible store (MinIO, Cloudflare R2, Ceph, a local moto) with the AWS
SDK's own variable, ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), and the usual credential chain; the
installed pyarrow honours both, and takes http or https from the URL. So the module's fixture sets exactly
what a user would: dummy credentials and the endpoint in the environment, which the ``ray-prune`` driver,
its embedded Ray and every Ray worker inherit. Nothing S3-specific is passed to ray-prune but ``s3://`` URIs.

The drivers are real ``ray-prune sweep`` subprocesses (``sweep/drivers.py``), one of them SIGKILLed during
trials. The secret access key and ``HF_TOKEN`` are sentinels, looked for in every object afterwards.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import quote
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import REPO, save_tiny_models, tiny_spec
from ray_prune.errors import UserError
from ray_prune.ledger.layout import LOCK, RESULTS, TABLES, TUNE
from ray_prune.ledger.rows import load_results
from ray_prune.ledger.storage import Storage
from ray_prune.sweep.experiment import parse_experiment
from sweep.drivers import Driver, expected_rows

BUCKET = "ray-prune-test"
REGION = "us-east-1"
ACCESS_KEY = "test-key-id-SENTINEL-51c3"
SECRET_KEY = "SENTINEL-secret-access-key/not+real/9d2f41"  # moto accepts any secret
HF_TOKEN = "hf_SENTINEL-s3-not-a-real-token-7d1e0b"
SENTINELS = {"AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "HF_TOKEN": HF_TOKEN}


@dataclass
class S3:
    endpoint: str
    client: object  # boto3's S3 client, for looking at the bucket from outside ray-prune

    def objects(self, prefix: str = "") -> dict[str, tuple[str, object]]:
        """key -> (ETag, LastModified) of every object under ``prefix``."""
        out = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            out.update({o["Key"]: (o["ETag"], o["LastModified"]) for o in page.get("Contents", [])})
        return out

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_it_answers(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"moto_server exited with {proc.returncode}"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert time.monotonic() < deadline, f"moto_server did not answer at {url}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port, the environment a user of an S3-compatible store sets, and one bucket."""
    import boto3

    tmp = tmp_path_factory.mktemp("moto")
    exe = Path(sys.executable).with_name("moto_server")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(tmp / "moto.log", "wb") as log:
        proc = subprocess.Popen([str(exe), "-p", str(port), "-H", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_until_it_answers(endpoint, proc)
        with pytest.MonkeyPatch.context() as mp:
            for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "RAY_ADDRESS"):
                mp.delenv(k, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", endpoint)  # the whole of "use this S3-compatible store"
            mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            mp.setenv("AWS_REGION", REGION)
            mp.setenv("AWS_DEFAULT_REGION", REGION)
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probes on a laptop
            mp.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))  # the user's ~/.aws plays no part
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))
            mp.setenv("HF_TOKEN", HF_TOKEN)
            client = boto3.client("s3")
            assert client.meta.endpoint_url == endpoint, "boto3 reads AWS_ENDPOINT_URL too"
            client.create_bucket(Bucket=BUCKET)
            yield S3(endpoint, client)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tokenizer):
    return save_tiny_models(tmp_path_factory.mktemp("models"), ["tiny-llama"], tokenizer)


def _spec(models_dir: Path, name: str, **over) -> dict:
    over.setdefault("fractions", [0.5])
    return tiny_spec(name=name, models=[str(models_dir / "tiny-llama")], **over)


def _check_rows(exp, uri: str):
    """Every expected (cell, stage) row once, each finished row with its metrics; returns the DataFrame."""
    df = load_results(uri)
    assert df.attrs["corrupt_files"] == []
    got = list(zip(df["cell_id"], df["stage"]))
    want = expected_rows(exp)
    assert len(got) == len(set(got)), "duplicated rows"
    assert set(got) == want, f"missing {want - set(got)}, extra {set(got) - want}"
    assert set(df["status"]) == {"finished"}
    for col in ("c4_loss", "boolq_acc", "wall_s", "finished_at"):
        assert df[col].notna().all(), f"a finished row lacks {col}"
    healed = df[df["stage"] == "healed"]
    assert (healed["steps_done"] == 4).all() and all(list(c) == [2, 4] for c in healed["curve_step"])
    return df


@pytest.fixture(scope="module")
def swept(s3, models_dir, tmp_path_factory):
    """One whole tiny sweep (1 model x 2 strategies at fraction 0.5: 2 cells) whose experiment says
    ``storage: s3://...``; no --storage on the command line."""
    uri = f"s3://{BUCKET}/full"
    spec = _spec(models_dir, "s3-full", storage=uri)
    t = time.monotonic()
    out = Driver(spec, None, spec_dir=tmp_path_factory.mktemp("full")).finish()
    wall = time.monotonic() - t
    print(f"\n[s3] full sweep of 2 cells on {uri}: {wall:.1f} s")
    return parse_experiment(spec), uri, out


def test_a_sweep_on_s3_writes_rows_tables_and_tune_state_there(s3, swept):
    exp, uri, out = swept
    assert f"-> {uri}" in out
    df = _check_rows(exp, uri)
    keys = [k for k in s3.objects("full/") if not k.endswith("/")]  # without the 0-byte "folder" markers
    tables = [k for k in keys if k.startswith(f"full/{TABLES}/")]
    assert "full/experiment.json" in keys and len(tables) == 1 and tables[0].endswith(".parquet")
    assert f"full/{LOCK}" not in keys, "the lock is released at the end"
    rows = [k for k in keys if k.startswith(f"full/{RESULTS}/") and k.endswith(".parquet")]
    assert len(rows) == len(df), "one object per row"
    ours = [k for k in keys if k.startswith((f"full/{RESULTS}/", f"full/{TABLES}/"))]
    assert not [k for k in ours if k.rsplit("/", 1)[-1].startswith(".")], "no hidden (temp) object in the dataset"

    # Ray Tune kept its own state under <root>/tune/ through the same S3 filesystem, not on local disk.
    tune = [k for k in keys if k.startswith(f"full/{TUNE}/")]
    runs = {k.split("/")[2] for k in tune}
    assert len(runs) == 1 and next(iter(runs)).startswith(exp.name), runs
    run = f"full/{TUNE}/{next(iter(runs))}"
    assert f"{run}/tuner.pkl" in keys
    assert [k for k in tune if k.startswith(f"{run}/experiment_state-") and k.endswith(".json")]
    trials = {k.split("/")[3] for k in tune if k.count("/") >= 4}
    assert len(trials) == len(df[df["stage"] == "healed"]), trials
    for trial in trials:
        for name in ("params.json", "result.json"):
            assert f"{run}/{trial}/{name}" in keys, f"{trial} lacks {name}"
        assert [k for k in keys if k.startswith(f"{run}/{trial}/checkpoint_") and
                k.endswith("adapter_model.safetensors")], f"{trial} has no heal checkpoint on S3"
    # The last reported heal step is in Tune's result.json, as on a local root.
    last = json.loads(s3.read(f"{run}/{sorted(trials)[0]}/result.json").splitlines()[-1])
    assert last["heal_step"] == 4
    assert not (REPO / "results" / exp.name).exists(), "nothing went to the default local root"


def test_load_results_status_and_report_read_the_s3_root(swept, tmp_path, capsys):
    import pyarrow.dataset as ds

    from ray_prune.cli import main

    exp, uri, _ = swept
    df = load_results(uri)
    assert len(df) == len(expected_rows(exp))
    # The results folder is a hive-partitioned Parquet dataset on S3 as well as on disk.
    storage = Storage(uri)
    dataset = ds.dataset(storage.path(RESULTS), filesystem=storage.fs, format="parquet", partitioning="hive")
    assert dataset.count_rows() == len(df)

    assert main(["status", uri]) == 0
    status = capsys.readouterr().out
    assert f"experiment {exp.name} at {uri}" in status
    assert "2 cells: 2 finished, 0 stopped early, 0 failed, 0 not run" in status

    out = tmp_path / "report"
    assert main(["report", uri, "--out", str(out)]) == 0
    assert (out / "index.html").is_file() and (out / "heal_curves.png").is_file()
    assert len((out / "results.csv").read_text().strip().splitlines()) == len(df) + 1
    # A report needs a local folder: the s3 root is not one.
    assert main(["report", uri]) == 2
    assert "pass --out DIR" in capsys.readouterr().err


def test_driver_killed_during_trials_on_s3_then_resumed_loses_and_duplicates_nothing(s3, models_dir, tmp_path):
    spec = _spec(models_dir, "s3-kill", fractions=[0.2, 0.5])  # 4 cells, 2 trials at a time
    exp = parse_experiment(spec)
    uri = f"s3://{BUCKET}/kill"
    prefix = f"kill/{RESULTS}/"

    def healed() -> int:
        return sum(1 for k in s3.objects(prefix) if k.endswith("-healed.parquet"))

    t = time.monotonic()
    first = Driver(spec, uri, spec_dir=tmp_path)
    first.kill_when(lambda: 1 <= healed() < 4, poll=0.2)
    killed_after = time.monotonic() - t
    before = {k: v for k, v in s3.objects(prefix).items() if k.endswith(".parquet")}
    assert Storage(uri).exists(LOCK), "a SIGKILLed driver cannot remove its lock"

    t = time.monotonic()
    second = Driver(spec, uri, spec_dir=tmp_path)  # same host, holder's pid gone: takes the lock over at once
    second.wait_for(lambda: "took over the lock" in second.output())
    # A second command on the same s3 root while this one runs refuses, naming the running one.
    rival = Driver(spec, uri, spec_dir=tmp_path / "rival").finish(rc=2)
    assert f"another sweep (pid {second.proc.pid} on" in rival and "use another --storage" in rival
    out = second.finish()
    resumed_in = time.monotonic() - t

    df = load_results(uri)
    got = list(zip(df["cell_id"], df["stage"]))
    want = expected_rows(exp)
    duplicates, missing = len(got) - len(set(got)), want - set(got)
    print(f"\n[s3] kill+resume on {uri}: {len(before)} rows before the kill ({killed_after:.1f} s in), "
          f"{len(df)} rows after the resume ({resumed_in:.1f} s), expected {len(want)}, "
          f"duplicates {duplicates}, missing {len(missing)}")
    _check_rows(exp, uri)
    after = {k: v for k, v in s3.objects(prefix).items() if k.endswith(".parquet")}
    assert len(after) == len(want), "one object per expected row, no strays"
    assert all(after[k] == v for k, v in before.items()), "rows finished before the kill were rewritten"
    done = sum(1 for k in before if k.endswith("-healed.parquet"))
    assert f"{done} already done, {4 - done} to run" in out
    assert not Storage(uri).exists(LOCK)


def test_a_live_lock_on_an_s3_root_refuses_a_sweep_and_a_stale_one_is_taken_over(s3, models_dir, tmp_path, capsys):
    from ray_prune.cli import main
    from ray_prune.sweep.lock import SweepLock

    uri = f"s3://{BUCKET}/locked"
    storage = Storage(uri)
    holder = {"token": "someone-else", "host": "another-host", "pid": 4242}
    storage.write_bytes(LOCK, json.dumps(holder).encode())
    path = tmp_path / "locked.yaml"
    path.write_text(json.dumps(_spec(models_dir, "s3-locked")))  # JSON is YAML
    assert main(["sweep", str(path), "--storage", uri]) == 2
    err = capsys.readouterr().err
    assert f"another sweep (pid 4242 on another-host) is running on {uri}" in err
    assert set(s3.objects("locked/")) <= {"locked/", f"locked/{LOCK}"}, "a refused sweep writes nothing"
    assert json.loads(storage.read_bytes(LOCK))["token"] == "someone-else", "and leaves the holder's lock alone"

    # Not rewritten for longer than the timeout, by the store's own clock: taken over, beats while held, and is
    # removed on release.
    storage.write_bytes(LOCK, json.dumps(holder).encode())
    time.sleep(2.2)
    with SweepLock(Storage(uri), heartbeat=0.2, stale_after=2.0) as lock:
        assert lock.took_over["host"] == "another-host"
        first = json.loads(storage.read_bytes(LOCK))
        assert first["token"] == lock.token
        time.sleep(0.6)
        assert json.loads(storage.read_bytes(LOCK))["beats"] > first["beats"]
        with pytest.raises(UserError, match="another sweep .* is running on s3://"):
            SweepLock(Storage(uri)).acquire()
    assert not storage.exists(LOCK)


def test_the_endpoint_comes_from_the_environment_with_its_scheme(s3, monkeypatch):
    """pyarrow reads AWS_ENDPOINT_URL (and the S3-only AWS_ENDPOINT_URL_S3, which wins) and speaks http or https
    as the URL says; what goes wrong says what to check."""
    storage = Storage(f"s3://{BUCKET}/endpoint")
    storage.check_writable()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there...
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)  # ...but the S3-specific variable wins
    Storage(f"s3://{BUCKET}/endpoint").check_writable()

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint.removeprefix("http://"))  # no scheme: https, refused here
    with pytest.raises(UserError, match="is not writable") as e:
        Storage(f"s3://{BUCKET}/endpoint").check_writable()
    assert "AWS_ENDPOINT_URL is set" in e.value.fix and "https if it has no scheme" in e.value.fix

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    with pytest.raises(UserError, match="is not writable") as e:
        Storage("s3://no-such-bucket/run").check_writable()
    assert "create the bucket first" in e.value.fix


def test_credentials_in_a_storage_uri_are_refused(s3):
    import pyarrow.fs as pafs

    secret = quote(SECRET_KEY, safe="")
    uri = f"s3://{ACCESS_KEY}:{secret}@{BUCKET}/in-uri"
    fs, path = pafs.FileSystem.from_uri(uri)  # pyarrow itself would take them...
    fs.get_file_info(path)
    for bad in (uri, f"s3://{BUCKET}/in-uri?secret_key={secret}"):
        with pytest.raises(UserError, match="carries credentials") as e:
            Storage(bad)  # ...but the URI is recorded in Tune's state and logs
        assert SECRET_KEY not in str(e.value) and secret not in str(e.value)


def test_no_secret_reaches_any_object_in_the_bucket(s3, swept):
    """Runs last: scans every object the sweeps above wrote (rows, tables, record, Tune state, checkpoints)."""
    def leaks() -> list[str]:
        found = []
        for key in s3.objects():
            body = s3.read(key)
            found += [f"{key}: {name}" for name, value in SENTINELS.items() if value.encode() in body]
        return found

    s3.client.put_object(Bucket=BUCKET, Key="canary/planted.txt", Body=f"x{SECRET_KEY}x".encode())
    assert leaks() == ["canary/planted.txt: AWS_SECRET_ACCESS_KEY"], "the scan finds a planted secret"
    s3.client.delete_object(Bucket=BUCKET, Key="canary/planted.txt")
    keys = s3.objects()
    assert len([k for k in keys if f"/{TUNE}/" in k]) > 10 and len([k for k in keys if f"/{RESULTS}/" in k]) > 4
    assert leaks() == []


def test_a_vanished_endpoint_is_one_line_for_status_and_sweep(s3, models_dir, tmp_path, monkeypatch, capsys):
    """The store goes away for good: `status` and `sweep` say so in one line naming the endpoint, and the fix."""
    from ray_prune.cli import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there any more
    uri = f"s3://{BUCKET}/gone"
    assert main(["status", uri]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "http://127.0.0.1:9" in err[0] and err[1].startswith("  fix:"), err
    path = tmp_path / "gone.yaml"
    path.write_text(json.dumps(_spec(models_dir, "gone")))
    assert main(["sweep", str(path), "--storage", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is not writable" in err[0] and err[1].startswith("  fix:"), err
