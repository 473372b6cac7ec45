"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

Every writer here follows the same recipe: write the whole payload to a temporary file in
the *same directory* as the target (so the final rename never crosses a file system), flush
it, ``os.fsync`` it, then ``os.replace`` it over the target. If anything fails before the
rename, the temporary file is removed and the previous file at ``path`` is left untouched.
After the rename the directory entry is fsynced too where the platform allows it, so the
rename itself survives a crash.

The temporary file is created with the usual ``0o666 & ~umask`` permissions (not the
``0o600`` that :func:`tempfile.mkstemp` would give), so a file written atomically has the same
mode as one written with :func:`open`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text"]

_TMP_SUFFIX = ".tmp"


def _open_temp(target: Path) -> tuple[int, Path]:
    """Create a fresh temporary file next to ``target``; return ``(fd, temp_path)``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file next to {target}")


def _fsync_dir(directory: Path) -> None:
    """Best-effort fsync of a directory entry (a no-op where directories can't be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; create missing parent folders; return the path.

    On any failure the temporary file is deleted and an existing file at ``path`` keeps its
    previous content.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"atomic_write_bytes expects bytes, got {type(data).__name__}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temp(target)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (encoded with ``encoding``, newlines untouched)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text expects str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON (``indent=2``, keys in insertion order, trailing newline) atomically.

    ``obj`` is serialized completely before anything touches the disk, so an object that
    :mod:`json` can't serialize raises ``TypeError``/``ValueError`` and leaves the previous
    file (if any) intact.
    """
    text = json.dumps(obj, indent=indent, sort_keys=False, ensure_ascii=False)
    if not text.endswith("\n"):
        text += "\n"
    return atomic_write_text(path, text)
