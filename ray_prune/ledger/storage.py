"""A sweep's storage root: a local path, ``s3://`` or ``gs://``, through pyarrow filesystems.

Every write is atomic: a reader sees a whole file or no file. Locally that is a
temp file renamed into place; object stores publish an object only when its
upload completes. Relative paths cannot climb out of the root.

``s3://`` reaches AWS or any S3-compatible store (MinIO, Cloudflare R2, Ceph) with
nothing but the environment, the same in the driver and in every Ray worker:
pyarrow's S3 filesystem takes the endpoint from ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL`` (http or https from the URL's scheme, https without one) and
credentials from the AWS chain (environment, ``~/.aws``, instance profile). A URI
that carries credentials (``s3://KEY:SECRET@bucket``) is refused: storage URIs are
recorded in Tune's trial state on the store, in logs and in the Ray dashboard.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ray_prune.core.atomic import TMP_PREFIX, TMP_SUFFIX, atomic_path
from ray_prune.errors import UserError


class Storage:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        if "://" in uri and not uri.startswith("file://"):
            _refuse_credentials(uri)
            try:
                self.fs, root = pafs.FileSystem.from_uri(uri)
            except (pa.ArrowInvalid, OSError) as e:
                fix = "use a local path, s3://bucket/prefix or gs://bucket/prefix with credentials set"
                raise UserError(f"storage {uri!r} cannot be opened: {e}",
                                _s3_fix() if uri.startswith("s3://") else fix) from None
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
        """Refuse, naming the root and the fix, a root that cannot be written; leave nothing behind either way. A
        local root that does not exist yet is not created here: its nearest existing folder is probed instead
        (the sweep's first write creates it), so ``--check`` and a refused run leave no empty folder."""
        try:
            if self.local and not Path(self.root).exists():
                parent = Path(self.root)
                while not parent.exists() and parent != parent.parent:
                    parent = parent.parent
                if not parent.is_dir():
                    raise NotADirectoryError(f"{parent} is not a folder")
                probe = parent / f".probe-{uuid.uuid4().hex}"
                probe.write_bytes(b"ok")
                probe.unlink()
                return
            probe = f".probe-{uuid.uuid4().hex}"
            self.fs.create_dir(self.root, recursive=True)
            self.write_bytes(probe, b"ok")
            self.fs.delete_file(self.path(probe))
        except (OSError, pa.ArrowException) as e:
            fix = "choose a storage path you can write to (--storage), or fix its permissions/credentials"
            raise UserError(f"storage {self.uri} is not writable: {e}",
                            _s3_fix() if self.uri.startswith("s3://") else fix) from None

    def mtime(self, relative: str) -> float:
        """When the file was last written, in seconds, by the storage's own clock (FileNotFoundError if absent)."""
        info = self.fs.get_file_info(self.path(relative))
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.path(relative))
        return info.mtime.timestamp()

    def now(self) -> float:
        """The storage's own clock: the modification time of a probe written now (then deleted). Ages of files
        taken against it compare no host's clock with another's."""
        probe = f".clock-{uuid.uuid4().hex}"
        self.write_bytes(probe, b"")
        try:
            return self.mtime(probe)
        finally:
            self.delete(probe)

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def _atomic(self, relative: str, write) -> None:
        """The one way anything is written here: ``write(path)`` to a hidden temp file published whole
        (``core.atomic``). Object stores publish an object only once its upload completes, so there the write
        goes straight to its key."""
        target = self.path(relative)
        if not self.local:
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            write(target)
            return
        with atomic_path(target) as tmp:
            write(str(tmp))

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
                 if i.base_name.startswith(TMP_PREFIX) and i.base_name.endswith(TMP_SUFFIX)]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def delete(self, relative: str) -> None:
        self.fs.delete_file(self.path(relative))

    def local_path(self, relative: str = "") -> Path | None:
        return Path(self.path(relative)) if self.local else None


_SECRET_QUERY_KEYS = {"access_key", "secret_key", "session_token"}


def _refuse_credentials(uri: str) -> None:
    """A storage URI is written to Tune's state and printed; credentials in it would be too."""
    parts = urlsplit(uri)
    if "@" in parts.netloc or _SECRET_QUERY_KEYS & {k.lower() for k, _ in parse_qsl(parts.query)}:
        raise UserError(f"storage URI {parts.scheme}://{parts.hostname or ''}/... carries credentials, which would "
                        "be recorded in Tune's trial state and logs",
                        "remove them from the URI: credentials come from the environment or the machine's identity "
                        "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, an instance profile, gcloud application-default "
                        "credentials, workload identity)")


def _s3_fix() -> str:
    """What to check when an s3:// root fails: the bucket, the credentials, and the endpoint pyarrow used."""
    endpoint = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else (
        "AWS_ENDPOINT_URL" if os.environ.get("AWS_ENDPOINT_URL") else None)
    where = (f"{endpoint} is set: check it names the store, with http:// or https:// (https if it has no scheme)"
             if endpoint else "for an S3-compatible store (MinIO, R2, Ceph) set AWS_ENDPOINT_URL=https://host:port")
    return ("create the bucket first (ray-prune never creates buckets); credentials come from the AWS chain "
            f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, an instance profile); {where}")
