"""Bounded hub data: a sweep reads each C4 role from a streaming source through the same
``datasets.load_dataset(path, name, split=..., streaming=True)`` call the hub path uses, stops as soon as it has
what it needs, packs the blocks once in stage 1, and no trial ever reads the source again.

The source is a local folder of a million generated documents (Parquet files that ``datasets`` streams like a
hub repository); the experiment points ``texts.c4`` at it, and no local mirror is set.
"""

from __future__ import annotations

import dataclasses
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from helpers import save_tiny_models, tiny_spec
from ray_prune.core.data import RowCount, load_texts
from ray_prune.ledger.storage import Storage
from ray_prune.sweep import shared_blocks
from ray_prune.sweep.experiment import parse_experiment

DOCUMENTS = 1_000_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """A million distinct documents of 40 to 80 words, in 4 Parquet files of small row groups."""
    root = tmp_path_factory.mktemp("c4-stream")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    words = np.array("the of and to in a is that for it as was with be by on not he this are or his from at "
                     "which but have an they you were their one all we can her has there been if more when".split())
    sentences = pa.array([" ".join(rng.choice(words, size=rng.integers(40, 80))) for _ in range(5000)])
    per = DOCUMENTS // 4
    for part in range(4):
        ids = np.arange(part * per, (part + 1) * per)
        text = pc.binary_join_element_wise(pc.take(sentences, pa.array(ids % len(sentences))),
                                           pc.cast(pa.array(ids), pa.string()), " ")
        pq.write_table(pa.table({"text": text}), root / "data" / f"train-{part:05d}.parquet", row_group_size=20_000)
    return str(root)


@pytest.fixture
def no_mirror(monkeypatch):
    monkeypatch.delenv("RAY_PRUNE_DATA_DIR", raising=False)


def _experiment(corpus: str, models: list[str]):
    base = tiny_spec()
    return parse_experiment(tiny_spec(models, "streamed", texts={"c4": {"path": corpus}}, fractions=[0.5],
                                      strategies=["deepest"],
                                      heal={**base["heal"], "steps": 20, "batch_size": 4, "seq_len": 64},
                                      eval={**base["eval"], "tasks": {}, "c4_sequences": 8, "seq_len": 64}))


def test_stage_one_reads_a_bounded_number_of_rows_and_trials_none(corpus, no_mirror, tokenizer, tmp_path):
    from ray_prune.sweep.grid import expand
    from ray_prune.sweep.trial import TrialSpec, run_cell

    models = save_tiny_models(tmp_path / "models", ["tiny-llama"], tokenizer)
    exp = _experiment(corpus, [str(models / "tiny-llama")])
    spec, storage = exp.models[0], Storage(str(tmp_path / "store"))
    source = exp.text_source("c4")
    assert source.hub_path == corpus

    count = RowCount()
    t = time.perf_counter()
    calibration = load_texts("calibration", exp.calibrations()[0].samples, source=source)
    wanted = shared_blocks.needs(exp.heal_points(spec), exp.eval.c4_sequences, exp.eval.seq_len)
    blocks = shared_blocks.make(storage, tokenizer, wanted, None, source, count=count)
    seconds = time.perf_counter() - t
    rows = sum(count.rows.values())
    print(f"stage 1 data: {seconds:.1f} s, rows read per role {count.rows} (of {DOCUMENTS:,}), "
          f"calibration {len(calibration)} documents")
    assert seconds < 60 and len(calibration) == exp.calibrations()[0].samples
    # 80 heal blocks of 64 tokens need ~90 documents of the heal role (60% of rows); selection and test ~10% each.
    assert {n.role for n in blocks} == {"heal", "selection", "test"}
    assert 0 < rows < 5_000, count.rows
    assert shared_blocks.read(storage, blocks[next(n for n in blocks if n.role == "heal")]).shape == (80, 64)

    # A trial reads its blocks from storage only: with the corpus gone it still runs start to finish.
    hidden = tmp_path / "gone"
    cell = dataclasses.replace(expand(exp, {spec.name: 6})[0], removed_layers=[2, 3, 4])
    trial = TrialSpec(cell=cell, storage_uri=storage.uri, data_dir=None, threads=1, baseline_loss=None,
                      reference_loss=None, do_unhealed=True,
                      blocks={n.role: p for n, p in blocks.items()})
    shutil.move(corpus, hidden)
    try:
        t = time.perf_counter()
        assert run_cell(trial).get("completed")
        print(f"a trial with the source removed: {time.perf_counter() - t:.1f} s")
    finally:
        shutil.move(hidden, corpus)
    from ray_prune.ledger.rows import load_results

    healed = load_results(storage.uri).query("stage == 'healed'")
    assert len(healed) == 1 and healed["tokens_seen"].iloc[0] == 20 * 4 * 64 and healed["c4_sequences"].iloc[0] == 8
