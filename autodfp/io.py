"""Atomic writes: a reader sees the old file, the new file, or nothing; never half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from autodfp.errors import AutoDFPError


@contextmanager
def atomic_writer(path: Path, mode: str = "wb"):
    """Yield a file in ``path``'s folder that replaces ``path`` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_writer(path, "w") as fh:
        fh.write(text)


def check_writable_folder(out: Path) -> None:
    """Raise one clear line unless a folder can be created atomically at ``out``: the same
    check :func:`atomic_directory` needs, done before any long work."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".probe")).rmdir()
    except OSError as exc:
        raise AutoDFPError(f"cannot write the output folder {out}: "
                           f"{exc.strerror or exc}") from None


@contextmanager
def atomic_directory(out: Path, *, overwrite: bool = False):
    """Yield a scratch folder that becomes ``out`` only when the block succeeds."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AutoDFPError(f"output path exists and is not a folder: {out}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AutoDFPError(f"output folder {out} is not empty; ask to overwrite it to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(out)
    scratch = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{os.getpid()}.",
                                    suffix=".tmp"))
    try:
        yield scratch
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(scratch, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _remove_stale_scratch(out: Path) -> None:
    """Scratch folders for ``out`` left by a process that was killed (kill -9, power loss):
    their name holds the writer's pid; a folder whose writer is gone is removed."""
    for scratch in out.parent.glob(f".{out.name}.*.tmp"):
        pid = scratch.name[len(out.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and scratch.is_dir():
            shutil.rmtree(scratch, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
