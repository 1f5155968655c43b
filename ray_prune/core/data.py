"""Where text and evaluation data come from: the hub, or a local Parquet mirror.

Real users read from the Hugging Face hub. Air-gapped machines (and our CI)
point ``--data-dir`` or ``$RAY_PRUNE_DATA_DIR`` at a folder laid out as
``<dataset>/<split>.parquet``; every dataset name below then maps to a file.

C4 serves three roles that must never share a document: calibration (the
distance profile), healing (training) and validation (the loss we report).
Each document goes to exactly one role by a hash of its text, so the split is
disjoint by construction, stable across runs and machines, and independent of
the order or the number of documents read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

from ray_prune.errors import UserError

DATA_DIR_ENV = "RAY_PRUNE_DATA_DIR"

Role = Literal["calibration", "heal", "validation"]
ROLES: tuple[Role, ...] = ("calibration", "heal", "validation")
# Percent of hash buckets per role: [0, 10) validation, [10, 30) calibration, [30, 100) heal.
_ROLE_BUCKETS: dict[str, range] = {
    "validation": range(0, 10),
    "calibration": range(10, 30),
    "heal": range(30, 100),
}


@dataclass(frozen=True)
class TextSource:
    """A text corpus: its hub coordinates and its local mirror's file."""

    hub_path: str
    hub_name: str | None
    hub_split: str
    local_file: str  # relative to the data dir
    text_field: str = "text"


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
            raise UserError(f"row {i} of {path} ({source.text_field!r}) is not UTF-8 text: {e.reason} at byte {e.start}",
                            "re-encode the corpus as UTF-8 (e.g. bytes.decode('latin-1') then write it as strings)") from None
    return out


def check_texts(needs: dict[Role, int], dataset: str = "c4", data_dir_path: str | os.PathLike | None = None) -> dict[str, int]:
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
    counts = {"calibration": 0, "heal": 0, "validation": 0, "empty": 0}
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
        import pyarrow.parquet as pq

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


def load_texts(
    role: Role,
    n: int | None = None,
    dataset: str = "c4",
    data_dir_path: str | os.PathLike | None = None,
) -> list[str]:
    """The first ``n`` usable documents of ``dataset`` that belong to ``role``.

    Empty and whitespace-only documents are skipped. Asking for more documents
    than the source holds is an error, not a silent shortfall.
    """
    out, root = _take(role, n, dataset, data_dir_path)
    if not out or (n is not None and len(out) < n):
        where = root if root is not None else TEXT_SOURCES[dataset].hub_path
        raise UserError(
            f"{dataset} ({where}) holds {len(out)} usable {role} documents, {n} were asked for",
            "ask for fewer samples or use a larger corpus",
        )
    return out


def _take(role: Role, n: int | None, dataset: str, data_dir_path) -> tuple[list[str], Path | None]:
    """Up to ``n`` usable documents of a role (all of them for None), and the mirror they came from."""
    if dataset not in TEXT_SOURCES:
        raise UserError(f"unknown text dataset {dataset!r}", f"use one of {', '.join(TEXT_SOURCES)}")
    if role not in ROLES:
        raise UserError(f"unknown data role {role!r}", f"use one of {', '.join(ROLES)}")
    if n is not None and n < 1:
        raise UserError(f"asked for {n} documents", "ask for at least 1")
    root = data_dir(data_dir_path)
    out: list[str] = []
    for text in _iter_texts(TEXT_SOURCES[dataset], root):
        if _usable(text) and role_of(text) == role:
            out.append(text)
            if n is not None and len(out) >= n:
                break
    return out, root


# A first guess of the documents that hold a number of tokens: C4 documents average ~480 SmolLM2 tokens,
# and 200 leaves margin for other tokenizers and short documents.
_TOKENS_PER_DOCUMENT_GUESS = 200


def texts_for_tokens(
    role: Role,
    tokens: int,
    tokenizer=None,
    dataset: str = "c4",
    data_dir_path: str | os.PathLike | None = None,
) -> list[str]:
    """Enough documents of ``role`` to hold ``tokens`` tokens, read in order, and no more than that guess needs.

    The first guess is ``tokens / 200 + 16`` documents. With a ``tokenizer``
    the guess is checked (each document's tokens plus its EOS) and doubled until
    it holds enough or the source runs out; a source that runs out returns all
    it has, and packing then says how many blocks that gave. Healing and the C4
    loss both take their text from here, so the same settings read the same
    documents everywhere.
    """
    if tokens < 1:
        raise UserError(f"asked for documents holding {tokens} tokens", "ask for at least 1 token")
    n = tokens // _TOKENS_PER_DOCUMENT_GUESS + 16
    while True:
        texts, _ = _take(role, n, dataset, data_dir_path)
        if not texts:
            return load_texts(role, 1, dataset, data_dir_path)  # raises the usual error naming the source
        if len(texts) < n or tokenizer is None or _holds(texts, tokenizer, tokens):
            return texts
        n *= 2


def _holds(texts: list[str], tokenizer, tokens: int, chunk: int = 64) -> bool:
    """Whether the documents hold at least ``tokens`` tokens, tokenizing only as far as needed."""
    count = 0
    for start in range(0, len(texts), chunk):
        count += sum(len(ids) + 1 for ids in tokenizer(texts[start:start + chunk], verbose=False)["input_ids"])
        if count >= tokens:
            return True
    return False


def texts_hash(texts: Iterable[str], *extra: object) -> str:
    """Content hash of a text set plus the settings that shaped it (for provenance)."""
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode("utf-8")).digest())
    for e in extra:
        h.update(repr(e).encode("utf-8"))
    return h.hexdigest()[:16]
