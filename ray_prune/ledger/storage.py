"""A sweep's storage root: a local path, ``s3://`` or ``gs://``, through pyarrow filesystems.

Every write is atomic: a reader sees a whole file or no file. Locally that is a
temp file renamed into place; object stores publish an object only when its
upload completes. Relative paths cannot climb out of the root.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_prune.errors import UserError
from ray_prune.ledger.layout import TMP_PREFIX


class Storage:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        if "://" in uri and not uri.startswith("file://"):
            try:
                self.fs, root = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowInvalid, OSError) as e:
                raise UserError(f"storage {uri!r} cannot be opened: {e}",
                                "use a local path, s3://bucket/prefix or gs://bucket/prefix with credentials set") from None
            self.local = False
        else:
            root = str(Path(uri.removeprefix("file://")).expanduser().resolve())
            self.fs = pafs.LocalFileSystem()
            self.local = True
            # Absolute from here on: Tune runs trials in their own working directories.
            self.uri = root
        self.root = root.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def path(self, relative: str) -> str:
        parts = PurePosixPath(relative).parts
        if PurePosixPath(relative).is_absolute() or ".." in parts:
            raise UserError(f"path {relative!r} escapes the storage root", "use a relative path without '..'")
        return f"{self.root}/{relative}" if relative else self.root

    def check_writable(self) -> None:
        probe = f".probe-{uuid.uuid4().hex}"
        try:
            self.fs.create_dir(self.root, recursive=True)
            self.write_bytes(probe, b"ok")
            self.fs.delete_file(self.path(probe))
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"storage {self.uri} is not writable: {e}",
                            "choose a storage path you can write to (--storage), or fix its permissions/credentials") from None

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def _atomic(self, relative: str, write) -> None:
        """The one way anything is written: ``write(path)`` to a temp file, then published whole.

        Object stores publish an object only once its upload completes, so there
        the write goes straight to its key.
        """
        target = self.path(relative)
        parent = target.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if not self.local:
            write(target)
            return
        tmp = f"{parent}/{TMP_PREFIX}{target.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            self._publish(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _publish(self, tmp: str, target: str) -> None:
        """Make a fully written local temp file visible under its name, in one rename."""
        os.replace(tmp, target)

    def write_bytes(self, relative: str, data: bytes) -> None:
        def write(p: str) -> None:
            with self.fs.open_output_stream(p) as out:
                out.write(data)

        self._atomic(relative, write)

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as f:
            return f.read()

    def write_table(self, relative: str, table: pa.Table) -> None:
        self._atomic(relative, lambda p: pq.write_table(table, p, filesystem=self.fs))

    def read_table(self, relative: str) -> pa.Table:
        return pq.read_table(self.path(relative), filesystem=self.fs)

    def _files(self, prefix: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def list_files(self, prefix: str, suffix: str = "") -> list[str]:
        """Relative paths of the files under ``prefix`` (hidden temp files excluded)."""
        return sorted(i.path[len(self.root) + 1:] for i in self._files(prefix)
                      if not i.base_name.startswith(TMP_PREFIX) and i.base_name.endswith(suffix))

    def remove_temp_files(self, prefix: str) -> int:
        """Delete temp files under ``prefix`` left by writers that died mid-write; only safe under the sweep lock."""
        if not self.local:
            return 0  # object stores publish whole objects: a dead writer leaves nothing
        stale = [i.path for i in self._files(prefix)
                 if i.base_name.startswith(TMP_PREFIX) and i.base_name.endswith(".tmp")]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def delete(self, relative: str) -> None:
        self.fs.delete_file(self.path(relative))

    def local_path(self, relative: str = "") -> Path | None:
        return Path(self.path(relative)) if self.local else None
