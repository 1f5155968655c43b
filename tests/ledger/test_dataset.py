"""The results folder of a real sweep is one Parquet dataset: pandas, pyarrow, DuckDB, Polars and Ray Data read it
directly and agree with ``load_results`` on every row and value; sweeps written in the older layout still load,
and the next sweep on their root moves them into the dataset."""

from __future__ import annotations


import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_prune.ledger.layout import PARTITION, RESULTS, slug
from ray_prune.ledger.rows import load_results
from ray_prune.ledger.schema import COLUMNS, ROW_SCHEMA

KEY = ["cell_id", "stage"]


def _plain(v):
    """One cell as plain Python: readers differ in NaN/None/pd.NA, numpy scalars and array types."""
    if hasattr(v, "tolist") and not isinstance(v, str):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return None if pd.isna(v) else v


def _same(v, w) -> bool:
    return _plain(v) == _plain(w)


def _assert_agree(df: pd.DataFrame, reference: pd.DataFrame, reader: str) -> None:
    assert len(df) == len(reference), reader
    missing = [c for c in COLUMNS if c not in df.columns]
    assert not missing, f"{reader} lacks {missing}"
    a = df.set_index(KEY).sort_index()
    b = reference.set_index(KEY).sort_index()
    assert list(a.index) == list(b.index), reader
    bad = [(c, i) for c in COLUMNS if c not in KEY for i, (v, w) in enumerate(zip(a[c], b[c])) if not _same(v, w)]
    assert not bad, f"{reader} differs from load_results at {bad[:5]}"


@pytest.fixture(scope="module")
def results(tiny_sweep):
    reference = load_results(str(tiny_sweep))
    assert len(reference) >= 9 and set(reference["stage"]) == {"baseline", "unhealed", "healed"}
    return tiny_sweep / RESULTS, reference


def test_every_file_has_the_declared_schema(results):
    folder, _ = results
    files = sorted(folder.rglob("*.parquet"))
    assert files and all(p.parent.name.startswith(f"{PARTITION}=") for p in files)
    assert all(pq.read_schema(p).equals(ROW_SCHEMA, check_metadata=False) for p in files)


def test_pandas_and_pyarrow_read_the_folder(results):
    import pyarrow.dataset as ds

    folder, reference = results
    df = pd.read_parquet(folder)
    _assert_agree(df, reference, "pandas.read_parquet")
    assert set(df[PARTITION].astype(str)) == set(reference["model"].map(slug))
    table = ds.dataset(folder, format="parquet", partitioning="hive").to_table()
    _assert_agree(table.to_pandas(), reference, "pyarrow.dataset")


def test_duckdb_and_polars_read_the_folder(results):
    import duckdb
    import polars as pl

    folder, reference = results
    pattern = str(folder / "**" / "*.parquet")
    _assert_agree(duckdb.sql(f"select * from read_parquet('{pattern}', hive_partitioning = true)").df(),
                  reference, "duckdb")
    _assert_agree(pl.read_parquet(pattern, hive_partitioning=True).to_pandas(), reference, "polars")


def test_ray_data_reads_the_folder(results):
    import ray

    folder, reference = results
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        df = ray.data.read_parquet(str(folder)).to_pandas()
    finally:
        ray.shutdown()
    _assert_agree(df, reference, "ray.data.read_parquet")


def _old_row_file(path, row: dict) -> None:
    """A row as versions before the declared schema wrote it: the layout results/<model>/, types inferred
    from the values (null-typed columns where a row holds None)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([row]), path)


def test_old_layout_loads_and_moves_into_the_dataset(tmp_path):
    from ray_prune.ledger.rows import upgrade_layout
    from ray_prune.ledger.storage import Storage

    base = {"experiment": "old", "unhealed_id": "", "status": "finished", "error": None, "model": "org/m",
            "num_layers": 10, "fraction": 0.0, "heal_lr": None, "seed": None, "code_version": "0.1.0"}
    _old_row_file(tmp_path / RESULTS / "org--m" / "b-baseline.parquet",
                  {**base, "cell_id": "b", "stage": "baseline", "n": 0, "strategy": "none", "removed_layers": [],
                   "boolq_acc": 0.6})
    _old_row_file(tmp_path / RESULTS / "org--m" / "h-healed.parquet",
                  {**base, "cell_id": "h", "stage": "healed", "n": 2, "strategy": "deepest",
                   "removed_layers": [7, 8], "heal_lr": 3e-4, "seed": 0, "boolq_acc": 0.55, "curve_step": [2, 4]})
    with pytest.raises(pa.ArrowException):  # the reason for the declared schema: mixed null/double columns
        pd.read_parquet(tmp_path / RESULTS)
    before = load_results(str(tmp_path))
    assert len(before) == 2 and list(before.loc[before["stage"] == "healed", "removed_layers"].iloc[0]) == [7, 8]
    assert upgrade_layout(Storage(str(tmp_path))) == 2
    assert not (tmp_path / RESULTS / "org--m").exists() or not any((tmp_path / RESULTS / "org--m").iterdir())
    after = load_results(str(tmp_path))
    _assert_agree(after, before, "load_results after the upgrade")
    _assert_agree(pd.read_parquet(tmp_path / RESULTS), before, "pandas after the upgrade")
