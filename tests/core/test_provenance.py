"""Provenance: the commit of a real git checkout (and its dirty mark), the installed library versions, the device,
and task config hashes that change when what lm-eval reads changes, and only then."""

from __future__ import annotations

import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

import ray_prune
from ray_prune.core import provenance
from ray_prune.core.evaluation.config import EvalConfig
from ray_prune.core.evaluation.tasks import TASKS, TASKS_DIR


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def _fresh_code_version(root: Path) -> str:
    provenance.code_version.cache_clear()  # once per process in use; each state of the checkout is asked anew here
    return provenance.code_version(root)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_is_the_commit_and_marks_uncommitted_changes(tmp_path):
    repo = tmp_path / "checkout"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    assert len(head) == 40
    assert _fresh_code_version(repo) == head
    (repo / "notes.txt").write_text("untracked\n")  # not code that ran: git describe --dirty ignores it too
    assert _fresh_code_version(repo) == head
    (repo / "code.py").write_text("x = 2\n")
    assert _fresh_code_version(repo) == head + "+dirty"
    _git(repo, "commit", "-q", "-am", "second")
    second = _git(repo, "rev-parse", "HEAD")
    assert second != head and _fresh_code_version(repo) == second


def test_code_version_without_a_checkout_is_the_package_version_and_its_source_hash(tmp_path, monkeypatch):
    monkeypatch.delenv(provenance.CODE_VERSION_ENV, raising=False)
    assert _fresh_code_version(tmp_path) == f"{ray_prune.__version__}+src.{provenance.source_hash()}"
    copy = tmp_path / "ray_prune"
    shutil.copytree(Path(ray_prune.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert provenance.source_hash(copy) == provenance.source_hash()  # by content, wherever the copy lies
    (copy / "core" / "select.py").write_text((copy / "core" / "select.py").read_text() + "# changed\n")
    assert provenance.source_hash(copy) != provenance.source_hash()


def test_code_version_from_the_environment_wins(tmp_path, monkeypatch):
    """A Ray job runs an uploaded copy without .git; the submitter passes its commit in the job's environment."""
    monkeypatch.setenv(provenance.CODE_VERSION_ENV, "0123abc")
    assert _fresh_code_version(tmp_path) == "0123abc"
    provenance.code_version.cache_clear()


def test_library_versions_are_the_installed_ones():
    versions = provenance.library_versions()
    assert list(versions) == list(provenance.LIBRARIES)
    for name, v in versions.items():
        assert v == version(name)


def test_device_name():
    assert provenance.device_name(None) is None
    cpu = provenance.device_name("cpu")
    info = Path("/proc/cpuinfo")
    if info.is_file():
        lines = info.read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
        flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
        if model:
            assert cpu.startswith(model)
        listed = cpu.rsplit("[", 1)[1].rstrip("]").split() if cpu.endswith("]") else []
        assert set(listed) == flags & set(provenance.CPU_FEATURES)
    assert provenance.device_name("cuda:0")  # a name, or says it is unknown: never fails the row


def _copy(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(TASKS_DIR, tmp_path / name))


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def test_task_hashes_are_stable_and_change_with_what_lm_eval_reads(tmp_path):
    tasks = list(TASKS)
    own = provenance.task_config_hashes(tasks)
    assert set(own) == set(tasks) and len(set(own.values())) == len(tasks)
    assert all(len(h) == provenance.HASH_CHARS for h in own.values())
    assert provenance.task_config_hashes(tasks, _copy(tmp_path, "same")) == own  # another folder, the same files

    cosmetic = _copy(tmp_path, "cosmetic")  # comments, line endings and ray-prune's own bookkeeping
    _edit(cosmetic / "rp_boolq.yaml", "# BoolQ,", "# The BoolQ task,")
    _edit(cosmetic / "rp_boolq.yaml", "majority_acc: 0.622", "majority_acc: 0.6")
    (cosmetic / "rp_gsm8k.yaml").write_bytes((cosmetic / "rp_gsm8k.yaml").read_bytes().replace(b"\n", b"\r\n"))
    assert provenance.task_config_hashes(tasks, cosmetic) == own

    changed = _copy(tmp_path, "changed")
    _edit(changed / "_rp_mmlu_template.yaml", "num_fewshot: 5", "num_fewshot: 3")  # MMLU's template
    _edit(changed / "rp_gsm8k.yaml", "version: 3.0", "version: 3.1")  # a task version
    _edit(changed / "rp_arc_easy.yaml", 'doc_to_text: "Question:', 'doc_to_text: "Q:')  # ARC-Challenge includes it
    _edit(changed / "winogrande_partial.py", "def doc_to_text", "def unused():\n    pass\n\n\ndef doc_to_text")
    referencing = [p.name for p in TASKS_DIR.glob("*.yaml") if "winogrande_partial." in p.read_text()]
    assert referencing == ["rp_winogrande.yaml"]  # the !function module only WinoGrande runs
    assert "include: rp_arc_easy.yaml" in (TASKS_DIR / "rp_arc_challenge.yaml").read_text()
    new = provenance.task_config_hashes(tasks, changed)
    assert {t for t in tasks if new[t] != own[t]} == {"mmlu", "gsm8k", "arc_easy", "arc_challenge", "winogrande"}


def test_each_mmlu_subject_counts(tmp_path):
    one = _copy(tmp_path, "subject")
    _edit(one / "rp_mmlu_virology.yaml", "dataset_name: virology", "dataset_name: anatomy")
    assert provenance.task_config_hashes(["mmlu"], one) != provenance.task_config_hashes(["mmlu"])


def test_eval_provenance_values():
    config = EvalConfig.from_dict({"tasks": {"boolq": None, "gsm8k": 3}, "batch_size": 2, "max_gen_toks": 64,
                                   "logprobs": "model"})
    values = provenance.eval_provenance(config, "nf4+fp32", "nf4", "cpu")
    hashes = provenance.task_config_hashes(["boolq", "gsm8k"])
    assert values["code_version"] == provenance.code_version()
    assert {k: values[f"{k}_version"] for k in provenance.LIBRARIES} == provenance.library_versions()
    assert (values["eval_batch_size"], values["eval_max_gen_toks"], values["eval_seed"]) == (2, 64, config.seed)
    assert (values["eval_precision"], values["quantization"]) == ("nf4+fp32", "nf4")
    assert values["eval_logprobs"] == "model"  # the config's, not the default's
    assert provenance.eval_provenance(EvalConfig(), "bf16", "none", None)["eval_logprobs"] == "fp32"
    assert values["device_name"] == provenance.device_name("cpu")
    assert (values["boolq_shots"], values["gsm8k_shots"]) == (TASKS["boolq"].shots, 3)
    assert values["gsm8k_config_hash"] == hashes["gsm8k"] and values["boolq_config_hash"] == hashes["boolq"]
    assert (values["boolq_metric"], values["gsm8k_metric"]) == ("acc", TASKS["gsm8k"].main_metric)
    assert not any(k.startswith("mmlu") for k in values)  # only the config's tasks
    assert set(provenance.FIELDS) <= set(values)
