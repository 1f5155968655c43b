"""The C4 roles: every document in exactly one, stable across runs and read orders, in the declared shares.

The split is what keeps the reported loss held out: heal validation, ASHA and picking a heal setting read
``selection``; the C4 loss in rows reads ``test``; profiling reads ``calibration``; training reads ``heal``.
"""

from __future__ import annotations

import hashlib
import math

import pandas as pd
import pytest

from ray_prune.core.data import ROLES, _ROLE_BUCKETS, iter_role, load_texts, role_of
from ray_prune.errors import UserError


def _c4(data_dir) -> list[str]:
    texts = pd.read_parquet(data_dir / "c4" / "train_sample.parquet")["text"].tolist()
    return [t for t in texts if isinstance(t, str) and t.strip()]


def test_buckets_cover_every_hash_value_once():
    buckets = sorted(b for r in _ROLE_BUCKETS.values() for b in r)
    assert buckets == list(range(100)) and set(_ROLE_BUCKETS) == set(ROLES)


def test_role_is_a_pure_function_of_the_text():
    """The bucket is sha256(text)[:8] mod 100: the same on every machine, in every run and read order."""
    for text in ["", "a", "The quick brown fox.", "ünïcödé ✓"]:
        bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
        assert bucket in _ROLE_BUCKETS[role_of(text)]


def test_reported_loss_and_selection_read_disjoint_documents(data_dir):
    test = set(load_texts("test", None, data_dir_path=data_dir))
    selection = set(load_texts("selection", None, data_dir_path=data_dir))
    calibration = set(load_texts("calibration", None, data_dir_path=data_dir))
    heal = set(load_texts("heal", None, data_dir_path=data_dir))
    assert test and selection and calibration and heal
    for a, b in [(test, selection), (test, heal), (test, calibration), (selection, heal), (selection, calibration),
                 (heal, calibration)]:
        assert not a & b
    assert len(test | selection | calibration | heal) == len(set(_c4(data_dir)))


def test_role_shares_on_the_c4_sample_match_the_declared_buckets(data_dir):
    texts = _c4(data_dir)
    for role, buckets in _ROLE_BUCKETS.items():
        share = len(buckets) / 100
        got = sum(role_of(t) == role for t in texts)
        sd = math.sqrt(len(texts) * share * (1 - share))
        assert abs(got - len(texts) * share) < 4 * sd, (role, got)


# Documents whose role was computed once (sha256 of the UTF-8 text, first 8 bytes big-endian, mod 100, into the
# buckets above) and must never change: a change of hash, bucket edges or encoding would silently move documents
# between training, selection and the reported test set of every sweep that ran before it.
KNOWN_ROLES = {"ünïcödé ✓": "test", "c": "selection", "d": "calibration", "layer pruning": "heal"}


def test_fixed_documents_keep_their_known_roles():
    assert {text: role_of(text) for text in KNOWN_ROLES} == KNOWN_ROLES
    assert set(KNOWN_ROLES.values()) == set(ROLES)  # one document of every role


def test_a_role_reads_its_documents_in_source_order(data_dir):
    texts = _c4(data_dir)
    assert list(iter_role("test", data_dir_path=data_dir)) == [t for t in texts if role_of(t) == "test"]


def test_asking_for_more_documents_than_a_role_holds_is_an_error(data_dir):
    with pytest.raises(UserError, match="usable test documents"):
        load_texts("test", 10_000, data_dir_path=data_dir)
