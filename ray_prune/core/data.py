"""Where text and evaluation data come from: the hub, or a local Parquet mirror.

Real users read from the Hugging Face hub. Air-gapped machines (and our CI)
point ``--data-dir`` or ``$RAY_PRUNE_DATA_DIR`` at a folder laid out as
``<dataset>/<split>.parquet``; every dataset name below then maps to a file.

C4 serves four roles that must never share a document: calibration (the
distance profile), heal (training), selection (the heal validation loss, which
ASHA and the report use to pick heal settings) and test (the C4 loss that rows
report). Each document goes to exactly one role by a hash of its text, so the
split is disjoint by construction, stable across runs and machines, and
independent of the order or the number of documents read. Keeping the loss we
report apart from the one settings are chosen on keeps the reported healed loss
honest in sweeps with several heal settings.

Every reader takes documents in order and stops as soon as it has what it
needs (:func:`iter_role`), so a streamed hub corpus of hundreds of millions of
documents costs only the rows a run uses; ``RowCount`` counts them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

from ray_prune.errors import UserError

DATA_DIR_ENV = "RAY_PRUNE_DATA_DIR"

Role = Literal["calibration", "heal", "selection", "test"]
ROLES: tuple[Role, ...] = ("calibration", "heal", "selection", "test")
# Percent of hash buckets per role. test is the bucket range the reported loss always used ([0, 10), then
# called "validation"), calibration is unchanged, and selection is carved out of what was heal's share.
_ROLE_BUCKETS: dict[str, range] = {
    "test": range(0, 10),
    "calibration": range(10, 30),
    "selection": range(30, 40),
    "heal": range(40, 100),
}


@dataclass(frozen=True)
class TextSource:
    """A text corpus: its hub coordinates and its local mirror's file."""

    hub_path: str  # a hub dataset id, or a local folder or script datasets.load_dataset streams the same way
    hub_name: str | None
    hub_split: str
    local_file: str  # relative to the data dir
    text_field: str = "text"

    def streamed_from(self, path: str, name: str | None = None, split: str = "train",
                      text_field: str = "text") -> "TextSource":
        """The same corpus streamed from elsewhere (a private mirror, a local folder of Parquet or JSON files)."""
        return TextSource(path, name, split, self.local_file, text_field)

    def identity(self, root: Path | None) -> dict:
        """What this corpus is, as files made from it are named: the local mirror's file (its size and content
        hash, ``core.fingerprint``) where a data dir is set, else where it streams from."""
        from ray_prune.core.fingerprint import file_identity

        if root is not None:
            return {"local_file": self.local_file, **file_identity(root / self.local_file)}
        return {"hub": self.hub_path, "name": self.hub_name, "split": self.hub_split, "field": self.text_field}


def roles_identity() -> dict[str, list[int]]:
    """The definition of the C4 roles (which hash buckets each takes): part of every file's name that holds
    documents of a role, so that redefining the roles never reuses blocks packed under the old ones."""
    return {role: [buckets.start, buckets.stop] for role, buckets in _ROLE_BUCKETS.items()}


class RowCount:
    """Rows a reader pulled from its source, by role (every row counts, whichever role it belongs to)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}

    def add(self, role: str, n: int = 1) -> None:
        self.rows[role] = self.rows.get(role, 0) + n


TEXT_SOURCES: dict[str, TextSource] = {
    "c4": TextSource("allenai/c4", "en", "train", "c4/train_sample.parquet"),
    "wikitext2": TextSource("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "wikitext2_raw/test.parquet"),
}


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data mirror, from the argument or the environment, or None for the hub."""
    value = explicit if explicit is not None else os.environ.get(DATA_DIR_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise UserError(
            f"data dir {path} does not exist",
            f"pass --data-dir (or set ${DATA_DIR_ENV}) to a folder holding <dataset>/<split>.parquet files",
        )
    return path


def local_file(root: Path, relative: str) -> Path:
    """A file of the local mirror, or a clear error naming it."""
    path = root / relative
    if not path.is_file():
        raise UserError(
            f"data file {path} is missing",
            f"the data dir must hold {relative}; check --data-dir / ${DATA_DIR_ENV}",
        )
    return path


def _local_texts(source: TextSource, root: Path) -> list[str | None]:
    """The text column of a mirror file, decoded; unreadable files and non-UTF-8 bytes are a UserError."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = local_file(root, source.local_file)
    fix = f"rewrite it as Parquet with a UTF-8 string column {source.text_field!r}"
    try:
        if source.text_field not in pq.read_schema(path).names:
            raise UserError(f"data file {path} has no column {source.text_field!r}", fix)
        table = pq.read_table(path, columns=[source.text_field])
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"data file {path} cannot be read as Parquet: {str(e).splitlines()[0]}", fix) from None
    column = table.column(source.text_field)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.to_pylist()
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise UserError(f"column {source.text_field!r} of {path} holds {column.type}, not text",
                        f"rewrite it with a UTF-8 string column {source.text_field!r}")
    out: list[str | None] = []
    for i, raw in enumerate(column.to_pylist()):
        try:
            out.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(
                f"row {i} of {path} ({source.text_field!r}) is not UTF-8 text: {e.reason} at byte {e.start}",
                "re-encode the corpus as UTF-8 (e.g. bytes.decode('latin-1') then write it as strings)") from None
    return out


def check_texts(needs: dict[Role, int], dataset: str = "c4",
                data_dir_path: str | os.PathLike | None = None) -> dict[str, int]:
    """Up-front check of a local mirror: readable, UTF-8, and enough usable documents for each role.

    Runs before any model loads (the hub is not checked: streaming it would
    cost the network round trips the check is meant to save). Returns the count
    of usable documents per role, plus ``empty``.
    """
    if dataset not in TEXT_SOURCES:
        raise UserError(f"unknown text dataset {dataset!r}", f"use one of {', '.join(TEXT_SOURCES)}")
    root = data_dir(data_dir_path)
    if root is None:
        return {}
    counts = {**{role: 0 for role in ROLES}, "empty": 0}
    for text in _local_texts(TEXT_SOURCES[dataset], root):
        if not _usable(text):
            counts["empty"] += 1
        else:
            counts[role_of(text)] += 1
    for role in ROLES:
        if counts[role] < needs.get(role, 0):
            raise UserError(
                f"{dataset} ({root / TEXT_SOURCES[dataset].local_file}) holds {counts[role]} usable {role} documents "
                f"({counts['empty']} empty documents skipped), {needs[role]} needed",
                ("ask for fewer calibration.samples, or " if role == "calibration" else "")
                + "point --data-dir at a larger corpus of non-empty text")
    return counts


def _usable(text: object) -> bool:
    """Empty and whitespace-only documents carry nothing to profile, train on or score."""
    return isinstance(text, str) and bool(text.strip())


def role_of(text: str) -> Role:
    """Assign a document to exactly one role by a stable hash of its text."""
    bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
    for role, buckets in _ROLE_BUCKETS.items():
        if bucket in buckets:
            return role  # type: ignore[return-value]
    raise AssertionError(bucket)


def _iter_texts(source: TextSource, root: Path | None) -> Iterator[str]:
    if root is not None:
        yield from _local_texts(source, root)
        return
    import datasets

    try:
        stream = datasets.load_dataset(source.hub_path, source.hub_name, split=source.hub_split, streaming=True)
        for row in stream:
            yield row[source.text_field]
    except (ConnectionError, OSError) as e:
        raise UserError(f"cannot read {source.hub_path} from the hub: {str(e).splitlines()[0]}",
                        f"check the network, or point --data-dir / ${DATA_DIR_ENV} at a local Parquet mirror") from None


def iter_role(role: Role, dataset: str = "c4", data_dir_path: str | os.PathLike | None = None,
              source: TextSource | None = None, count: RowCount | None = None) -> Iterator[str]:
    """The usable documents of ``role``, in source order, read lazily: stop iterating and reading stops.

    ``source`` replaces where ``dataset`` streams from (the local mirror, when a data dir is set, wins).
    """
    if dataset not in TEXT_SOURCES:
        raise UserError(f"unknown text dataset {dataset!r}", f"use one of {', '.join(TEXT_SOURCES)}")
    if role not in ROLES:
        raise UserError(f"unknown data role {role!r}", f"use one of {', '.join(ROLES)}")
    root = data_dir(data_dir_path)
    for text in _iter_texts(source or TEXT_SOURCES[dataset], root):
        if count is not None:
            count.add(role)
        if _usable(text) and role_of(text) == role:
            yield text


def load_texts(
    role: Role,
    n: int | None = None,
    dataset: str = "c4",
    data_dir_path: str | os.PathLike | None = None,
    source: TextSource | None = None,
) -> list[str]:
    """The first ``n`` usable documents of ``dataset`` that belong to ``role`` (all of them for None).

    Empty and whitespace-only documents are skipped. Asking for more documents
    than the source holds is an error, not a silent shortfall.
    """
    if n is not None and n < 1:
        raise UserError(f"asked for {n} documents", "ask for at least 1")
    out: list[str] = []
    for text in iter_role(role, dataset, data_dir_path, source):
        out.append(text)
        if n is not None and len(out) >= n:
            break
    if not out or (n is not None and len(out) < n):
        root = data_dir(data_dir_path)
        where = root if root is not None else (source or TEXT_SOURCES[dataset]).hub_path
        raise UserError(
            f"{dataset} ({where}) holds {len(out)} usable {role} documents, {n} were asked for",
            "ask for fewer samples or use a larger corpus",
        )
    return out


def texts_hash(texts: Iterable[str], *extra: object) -> str:
    """Content hash of a text set plus the settings that shaped it (for provenance)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    for e in extra:
        h.update(repr(e).encode("utf-8"))
    return h.hexdigest()[:16]
