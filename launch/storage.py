"""Where runs live: a local (or NFS) folder, or a URI that Tune accepts (``s3://``,
``gs://``, ``hdfs://``, ``abfs://``, ``file://``), through a pyarrow filesystem.

Everything the search writes outside Tune's own files (``search.json``, ``best.json``,
``episodes.jsonl``, report plots) and everything ``resume``, ``export`` and ``report`` read
goes through :class:`Location`, so a run on a bucket is read back from the same URI.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from autodfp.errors import AutoDFPError
from autodfp.io import atomic_writer

URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
"""Schemes pyarrow resolves on its own (the ones Tune's ``storage_path`` accepts without
fsspec)."""


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def _scheme(location: str) -> str:
    return location.split("://", 1)[0].lower()


def check_location(location: str | os.PathLike) -> str:
    """A local path made absolute, or a URI with a scheme we can open; one line otherwise."""
    location = str(location)
    if not is_uri(location):
        return str(Path(location).expanduser().resolve())
    if _scheme(location) not in URI_SCHEMES:
        raise AutoDFPError(f"storage {location!r}: unknown scheme {_scheme(location)!r} "
                           f"(a local folder, or one of {', '.join(s + '://' for s in URI_SCHEMES)})")
    return location.rstrip("/")


@dataclass(frozen=True)
class Location:
    """A folder on a pyarrow filesystem. ``uri`` is how a user names it (a local path or a
    URI); ``fs`` and ``path`` are what pyarrow opens."""

    uri: str
    fs: object
    path: str

    @classmethod
    def of(cls, location: str | os.PathLike) -> "Location":
        from pyarrow import fs as pafs

        location = check_location(location)
        if not is_uri(location):
            return cls(location, pafs.LocalFileSystem(), location)
        try:
            filesystem, path = pafs.FileSystem.from_uri(location)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... by backend
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise AutoDFPError(f"cannot open storage {location}: {first}") from None
        return cls(location, filesystem, path.rstrip("/"))

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def is_local(self) -> bool:
        from pyarrow import fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)

    def local_path(self) -> Path:
        """The folder on this machine (a local location only)."""
        if not self.is_local:
            raise AutoDFPError(f"{self.uri} is not on this machine")
        return Path(self.path)

    def child(self, *names: str) -> "Location":
        sep = "" if self.uri.endswith("/") else "/"
        return Location(self.uri + sep + "/".join(names), self.fs, posixpath.join(self.path, *names))

    def __str__(self) -> str:
        return self.uri

    # -- queries ----------------------------------------------------------------------------

    def _info(self, name: str | None = None):
        path = posixpath.join(self.path, name) if name else self.path
        try:
            return self.fs.get_file_info(path)
        except OSError as exc:
            raise AutoDFPError(f"cannot read {self.uri}: {exc}") from None

    def is_dir(self, name: str | None = None) -> bool:
        from pyarrow import fs as pafs

        return self._info(name).type == pafs.FileType.Directory

    def is_file(self, name: str) -> bool:
        from pyarrow import fs as pafs

        return self._info(name).type == pafs.FileType.File

    def list_dirs(self) -> list[str]:
        """Names of the folders directly inside."""
        from pyarrow import fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError as exc:
            raise AutoDFPError(f"cannot list {self.uri}: {exc}") from None
        return sorted(info.base_name for info in infos if info.type == pafs.FileType.Directory)

    def is_empty(self) -> bool:
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return not infos

    # -- reading and writing ----------------------------------------------------------------

    def read_bytes(self, name: str) -> bytes:
        try:
            with self.fs.open_input_stream(posixpath.join(self.path, name)) as stream:
                return stream.read()
        except OSError as exc:
            raise AutoDFPError(f"cannot read {self.uri}/{name}: {exc}") from None

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def makedirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Whole or not at all: written beside the target, then moved over it (a rename on
        a local or POSIX filesystem; an object store replaces the object in one put)."""
        target = posixpath.join(self.path, name)
        if self.is_local:
            with atomic_writer(Path(target)) as stream:
                stream.write(data)
            return
        self.fs.create_dir(posixpath.dirname(target), recursive=True)
        with self.fs.open_output_stream(target) as stream:
            stream.write(data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def append_text(self, name: str, text: str) -> None:
        """Appended on a local filesystem; object stores cannot append, so there the file is
        read and written back whole (an episode log of a few MB at most)."""
        target = posixpath.join(self.path, name)
        if self.is_local:
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
            with self.fs.open_append_stream(target) as stream:
                stream.write(text.encode())
            return
        before = self.read_bytes(name) if self.is_file(name) else b""
        self.write_bytes(name, before + text.encode())
