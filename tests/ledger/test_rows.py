"""The results dataset: rows written one file each, read back whole, corrupt files listed, never silently dropped."""

from __future__ import annotations

import pytest

from ray_prune.ledger.rows import load_results


def test_load_results_reports_corrupt_files(tmp_path, capsys):
    from ray_prune.ledger.rows import write_row
    from ray_prune.ledger.storage import Storage

    s = Storage(str(tmp_path))
    write_row(s, {"experiment": "x", "cell_id": "a", "stage": "healed", "status": "finished", "model": "m",
                  "strategy": "deepest", "n": 1})
    (tmp_path / "results" / "model_slug=m" / "b-healed.parquet").write_bytes(b"PAR1 truncated")
    whole = (tmp_path / "results" / "model_slug=m" / "a-healed.parquet").read_bytes()  # a full disk: cut in half
    (tmp_path / "results" / "model_slug=m" / "c-healed.parquet").write_bytes(whole[: len(whole) // 2])
    with pytest.warns(UserWarning, match="corrupt result file") as caught:
        df = load_results(str(tmp_path))
    assert len(df) == 1 and len(df.attrs["corrupt_files"]) == 2 and len(caught) == 2
    # Never silently dropped: `ray-prune status` lists both, and the ledger treats their cells as not done.
    from ray_prune.cli import main
    from ray_prune.ledger.done import done_ids

    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 corrupt result file(s)" in out and "b-healed.parquet" in out and "c-healed.parquet" in out
    assert set(done_ids(s)) == {("a", "healed")}
