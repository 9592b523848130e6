"""Atomic file writes: the one place where a file is written under a temp name and renamed.

A reader never sees half a file, and two writers of the same path never share a temp name (the
temp name holds the writer's pid and 8 random hex digits). Local paths use ``os.replace``; a
``pyarrow.fs`` filesystem (a storage URI every node reaches) uses its ``move``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any


def temp_path(path: str | os.PathLike) -> Path:
    """A temp name beside ``path``, unique per writer (pid + random), for write + rename."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a unique temp file and ``os.replace``;
    the parent directory is created. On an error the temp file is removed and ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_atomic_fs(fs: Any, path: str, data: bytes) -> None:
    """``write_atomic`` on a ``pyarrow.fs.FileSystem``: a unique temp name beside ``path``, then
    ``fs.move`` (a rename on local and HDFS filesystems, copy + delete on object stores, where a
    reader sees the old object or the whole new one)."""
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except Exception:  # noqa: BLE001 - nothing was written, or it is gone already
            pass
        raise
