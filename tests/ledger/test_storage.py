"""Storage roots: paths stay inside the root, relative roots become absolute, writes are atomic."""

from __future__ import annotations

import pytest

from ray_prune.errors import UserError


def test_storage_paths_cannot_escape_the_root(tmp_path):
    from ray_prune.ledger.storage import Storage

    s = Storage(str(tmp_path))
    for bad in ("../x.parquet", "results/../../x", "/etc/passwd"):
        with pytest.raises(UserError, match="escapes the storage root"):
            s.write_bytes(bad, b"x")
    assert not (tmp_path.parent / "x.parquet").exists()


def test_relative_local_storage_is_made_absolute(tmp_path, monkeypatch):
    """Trials run in their own working directories; a relative storage path must not follow them there."""
    from ray_prune.ledger.storage import Storage

    monkeypatch.chdir(tmp_path)
    s = Storage("results/x")
    assert s.uri == str(tmp_path / "results" / "x")
    monkeypatch.chdir(tmp_path.parent)
    assert Storage(s.uri).path("a") == str(tmp_path / "results" / "x" / "a")
