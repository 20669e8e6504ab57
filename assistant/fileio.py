"""Atomic writes: a temp file in the same folder, fsync, then rename over the target.

A crash at any point leaves either the old file or the new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from assistant.errors import BedsideError


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_failure_kind(path: Path, err: BaseException) -> str:
    """Classify a failed write of `path`: "no_space", "read_only" or "other".

    numpy, FAISS and SQLite report a short write on a full disk without an errno, so a failure
    without one counts as "no_space" when less than 1 MiB is free where `path` lives.
    """
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC:
        return "no_space"
    if code in {errno.EACCES, errno.EPERM, errno.EROFS}:
        return "read_only"
    if code is None:
        folder = Path(path)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 1 << 20:
                return "no_space"
    return "other"


def explain_write_error(path: Path, err: OSError, setting: str = "") -> BedsideError:
    """Turn an OSError from writing `path` into a one-line BedsideError naming the path and the fix.

    `setting` names the option or setting that chose the location (e.g. "--out"), so the message
    can say which one to change.
    """
    where = f" for {setting}" if setting else ""
    kind = write_failure_kind(path, err)
    if kind == "no_space":
        return BedsideError(f"no space left on the device writing {str(path)!r}; free disk space and rerun")
    if kind == "read_only":
        return BedsideError(f"cannot write {str(path)!r} (permission denied or read-only); "
                            f"choose a writable folder{where}")
    # numpy and some other writers raise OSError without an errno when a write comes up short
    return BedsideError(f"writing {str(path)!r} failed ({err}); check free disk space and permissions, "
                        "then rerun")


def ensure_writable_folder(folder: Path, setting: str = "") -> Path:
    """Create `folder` if needed and prove it takes a file, before any slow work writes there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".bedside-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise explain_write_error(folder, err, setting) from err
    return folder


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise explain_write_error(path, err) from err
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise explain_write_error(path, err) from err


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an advisory lock on `path` for the duration; a second holder fails fast with a clear error."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as err:
        raise explain_write_error(path, err) from err
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise BedsideError(
                f"{str(path)!r} is locked by another bedside process; wait for it to finish and rerun"
            ) from err
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
