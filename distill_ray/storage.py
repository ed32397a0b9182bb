"""Reading and writing artifacts under a workdir that is a local path or `s3://bucket/prefix`.

One small module for every step: datasets are Parquet folders (readable with pyarrow or Ray Data),
small documents are JSON. S3 goes through pyarrow's S3 filesystem with credentials from the usual
AWS environment (env vars, profile, instance role); an S3-compatible server (MinIO, moto) is
reached by setting the standard `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem honouring the standard AWS endpoint and region variables."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path inside it) for a local path or an s3:// URI."""
    if is_s3(uri):
        parsed = urlparse(uri)
        return s3_filesystem(), f"{parsed.netloc}{parsed.path}".rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def expand_source(uri: str, extensions: tuple[str, ...]) -> list[str]:
    """Expand a file, a directory (recursively) or a glob into a sorted list of file URIs.

    Raises:
        FileNotFoundError: when nothing matches.
    """
    fs, path = filesystem_for(uri)
    prefix = "s3://" if is_s3(uri) else ""
    if any(ch in path for ch in "*?["):
        import fnmatch

        base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        found = sorted(i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, path))
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            found = [path]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            found = sorted(
                i.path for i in infos
                if i.type == pafs.FileType.File and i.path.lower().endswith(extensions)
                and not posixpath.basename(i.path).startswith((".", "_"))
            )
        else:
            found = []
    if not found:
        raise FileNotFoundError(uri)
    return [prefix + p for p in found]


def content_hash(uri: str, chunk_bytes: int = 8 << 20) -> str:
    """sha256 of a file's bytes (local or S3), streamed."""
    fs, path = filesystem_for(uri)
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def json_hash(obj: Any) -> str:
    """A stable hash of a JSON-serialisable object (dict keys sorted)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Workdir:
    """The root of one pipeline's artifacts: `<workdir>/<step>/...`.

    A relative local path is made absolute when the Workdir is made, so that it names the same
    folder in every process it is handed to (Ray workers do not share the driver's current directory).
    """

    uri: str

    def __post_init__(self) -> None:
        if not is_s3(self.uri):
            object.__setattr__(self, "uri", os.path.abspath(os.path.expanduser(self.uri)))

    @property
    def fs(self) -> pafs.FileSystem:
        return filesystem_for(self.uri)[0]

    @property
    def root(self) -> str:
        return filesystem_for(self.uri)[1]

    def uri_of(self, *parts: str) -> str:
        """The URI (s3://... or absolute local path) of a file or folder under the workdir."""
        base = self.uri.rstrip("/") if is_s3(self.uri) else os.path.abspath(self.uri)
        return posixpath.join(base, *parts) if parts else base

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self._path(*parts)).type != pafs.FileType.NotFound

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a file in one piece: atomically on local disks (rename), an S3 PUT is atomic already."""
        fs, path = self.fs, self._path(*parts)
        fs.create_dir(posixpath.dirname(path), recursive=True)
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        else:
            with fs.open_output_stream(path) as stream:
                stream.write(data)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self._path(*parts)) as stream:
            return stream.read()

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes((json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode(), *parts)

    def read_json(self, *parts: str) -> Any | None:
        """The parsed JSON document, or None when it does not exist."""
        try:
            return json.loads(self.read_bytes(*parts))
        except FileNotFoundError:
            return None

    def remove(self, *parts: str) -> None:
        """Delete a file or a folder (recursively); missing is fine."""
        fs, path = self.fs, self._path(*parts)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)

    def write_table(self, table: pa.Table, *parts: str) -> None:
        """Replace the Parquet dataset folder `parts` with one file holding `table`."""
        self.remove(*parts)
        buffer = pa.BufferOutputStream()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(buffer.getvalue().to_pybytes(), *parts, "part-00000.parquet")

    def read_table(self, *parts: str) -> pa.Table:
        """Read a Parquet dataset folder written by any step (pyarrow, or Ray Data's write_parquet)."""
        import pyarrow.dataset as pads

        return pads.dataset(self._path(*parts), filesystem=self.fs, format="parquet").to_table()

    def list_files(self, *parts: str) -> Iterator[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(*parts), recursive=True, allow_not_found=True))
        root = self._path(*parts)
        for info in infos:
            if info.type == pafs.FileType.File:
                yield posixpath.relpath(info.path, root)

