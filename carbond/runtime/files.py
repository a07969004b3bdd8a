"""State files written so that a crash or a full disk never leaves half of one behind."""

from __future__ import annotations

import contextlib
import os
import tempfile

STATE_FILE_MODE = 0o640


def write_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Sibling temp file, fsync, rename, fsync the directory: readers see old or new, not half.

    Raises OSError (a full or read-only disk); the old file is then untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), STATE_FILE_MODE)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # durability of the rename; not all filesystems allow
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
