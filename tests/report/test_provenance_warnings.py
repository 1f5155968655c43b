"""``ray-prune status`` and the report state what the rows were computed with, once where they agree, and warn,
naming the field and its values, where rows that are compared differ; rows older than provenance are unknown."""

from __future__ import annotations

import html

import pandas as pd

from ray_prune.core.evaluation.config import EvalConfig
from ray_prune.core.provenance import eval_provenance
from ray_prune.ledger.rows import load_results, write_row
from ray_prune.ledger.storage import Storage
from ray_prune.report.status import check_provenance, status_report, summary_table
from ray_prune.report.write import write_report

PROVENANCE = eval_provenance(EvalConfig.from_dict({"tasks": ["boolq"], "batch_size": 4}), "fp32", "none", "cpu")


def _store(tmp_path, changes: dict[tuple[str, str, str], dict] | None = None, old: tuple[str, ...] = ()) -> str:
    """Baseline and two healed rows for models m1 and m2, provenance as this process computes it, with
    ``changes`` by (model, cell_id, stage); the models in ``old`` written as versions without provenance did."""
    s = Storage(str(tmp_path))
    for model in ("m1", "m2"):
        for cell_id, stage, n, acc in (("b", "baseline", 0, 0.62), ("h1", "healed", 1, 0.6), ("h2", "healed", 2, 0.55)):
            row = {"experiment": "p", "model": model, "cell_id": f"{model}-{cell_id}", "stage": stage,
                   "status": "finished", "num_layers": 10, "n": n, "strategy": "none" if n == 0 else "deepest",
                   "boolq_acc": acc, "boolq_acc_stderr": 0.05, "boolq_n": 100, "boolq_shots": 0}
            if model in old:
                row["code_version"] = "0.1.0"  # what every row recorded before, whatever the commit
            else:
                row |= PROVENANCE | (changes or {}).get((model, cell_id, stage), {})
            write_row(s, row)
    return str(tmp_path)


def test_no_warning_where_rows_agree(tmp_path):
    uri = _store(tmp_path)
    check = check_provenance(load_results(uri))
    assert check.warnings == () and check.unknown == "" and not check.table["differs"].any()
    text = status_report(uri)
    assert "warning:" not in text and f"lm_eval_version={PROVENANCE['lm_eval_version']}" in text
    assert f"boolq_config_hash={PROVENANCE['boolq_config_hash']}" in text and "boolq_metric=acc" in text
    assert text.count("lm_eval_version=") == 1  # once, for every row


def test_status_warns_naming_the_field_and_both_values(tmp_path):
    uri = _store(tmp_path, {("m1", "h2", "healed"): {"lm_eval_version": "0.4.2"}})
    lines = status_report(uri).splitlines()
    warnings = [ln.strip() for ln in lines if ln.strip().startswith("warning:")]
    assert len(warnings) == 1, warnings
    w = warnings[0]
    assert "lm_eval_version" in w and "0.4.2" in w and PROVENANCE["lm_eval_version"] in w
    assert "within m1" in w and "[m1: healed]" in w and "m1: baseline, healed" in w  # which rows hold which value
    assert not any("lm_eval_version=" in ln for ln in lines)  # a field that differs is not listed as agreed
    assert "transformers_version=" in "\n".join(lines)
    assert "lm_eval_version" in summary_table(load_results(uri))  # the sweep's closing summary says it too


def test_models_drawn_together_and_task_fields(tmp_path):
    m2 = {(m, c, s): {"device_name": "NVIDIA H100", "boolq_metric": "acc_norm"} for m in ["m2"]
          for c, s in (("b", "baseline"), ("h1", "healed"), ("h2", "healed"))}
    check = check_provenance(load_results(_store(tmp_path, m2)))
    fields = {w.split(" differ in ")[1].split(" ")[0]: w for w in check.warnings}
    assert set(fields) == {"device_name", "boolq_metric"}
    assert "between models drawn in one figure" in fields["boolq_metric"]
    assert "acc_norm [m2: baseline, healed ×2]" in fields["boolq_metric"] and "acc [m1:" in fields["boolq_metric"]
    differs = check.table[check.table["differs"]]
    assert sorted(differs.loc[differs["field"] == "device_name", "value"]) == sorted(
        ["NVIDIA H100", PROVENANCE["device_name"]])


def test_old_rows_are_unknown_once_not_a_difference(tmp_path):
    uri = _store(tmp_path, old=("m2",))
    check = check_provenance(load_results(uri))
    assert check.warnings == ()  # m2's code_version "0.1.0" and its null fields are not compared
    assert "3 finished rows [m2: baseline, healed ×2]" in check.unknown
    assert status_report(uri).count("provenance unknown") == 1


def test_a_library_missing_on_one_machine_is_a_difference(tmp_path):
    check = check_provenance(load_results(_store(tmp_path, {("m1", "b", "baseline"): {"bitsandbytes_version": None}})))
    assert len(check.warnings) == 1 and "bitsandbytes_version" in check.warnings[0]
    assert "not installed [m1: baseline]" in check.warnings[0]


def test_report_page_shows_provenance_and_the_warning(tmp_path):
    uri = _store(tmp_path / "store", {("m1", "b", "baseline"): {"torch_version": "2.4.0"}})
    index = write_report(uri, str(tmp_path / "rep"))
    text = index.read_text(encoding="utf-8")
    notices = text.split("<nav>")[0]  # before the figures
    assert "Rows that are compared were computed differently" in notices
    assert "torch_version" in notices and "2.4.0" in notices and html.escape(PROVENANCE["torch_version"]) in notices
    assert "id='provenance'" in text and html.escape(PROVENANCE["boolq_config_hash"]) in text
    table = pd.read_csv(tmp_path / "rep" / "provenance.csv")
    assert set(table.loc[table["differs"], "field"]) == {"torch_version"}
    assert set(table.loc[table["field"] == "torch_version", "value"]) == {"2.4.0", PROVENANCE["torch_version"]}
    agreeing = write_report(_store(tmp_path / "same"), str(tmp_path / "rep2")).read_text(encoding="utf-8")
    assert "computed differently" not in agreeing and "id='provenance'" in agreeing


def test_a_real_sweep_records_provenance_in_every_finished_row(tiny_sweep, tmp_path):
    """Baseline rows (stage 1's actor) and trial rows (Tune's workers) of one sweep on one machine agree."""
    import re

    import ray_prune
    from ray_prune.core.provenance import device_name

    df = load_results(str(tiny_sweep))
    ok = df[df["status"] == "finished"]
    assert set(ok["stage"]) == {"baseline", "unhealed", "healed"}
    code = ok["code_version"].iloc[0]  # the checkout's commit when the sweep ran (it may have moved on since)
    assert (ok["code_version"] == code).all() and (ok["device_name"] == device_name("cpu")).all()
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", code) or code == ray_prune.__version__
    scored = ok[ok["boolq_n"].notna()]
    assert len(scored) == len(ok) and (scored["boolq_config_hash"] == PROVENANCE["boolq_config_hash"]).all()
    check = check_provenance(df)
    assert check.warnings == () and check.unknown == ""
    text = write_report(str(tiny_sweep), str(tmp_path / "rep")).read_text(encoding="utf-8")
    assert "computed differently" not in text and html.escape(code) in text
