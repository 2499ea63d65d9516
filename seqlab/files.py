"""Files that are whole or absent: every result, checkpoint and table seqlab writes goes through
`write_atomic`, so a crash or a kill mid-write leaves the old file or the new one, never half.
A folder one process writes in at a time (a run's checkpoints) is held with `exclusive_folder`."""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def writable_dir(path: str | os.PathLike) -> Path:
    """`path` if it is a folder this process can write, or could be made as one; a ValueError
    saying why not otherwise. Nothing is created: a missing folder is judged by its nearest
    existing parent, so a run refused later (a bad option) leaves no empty folder behind. Checked
    by writing a temporary file, not by permission bits."""
    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # exists() follows links: a dangling one cannot be made a folder
            raise ValueError(
                f"{str(path)!r} cannot be made: {str(probe)!r} is a broken symbolic link "
                f"(to {os.readlink(probe)!r})"
            )
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        if probe == path:
            raise ValueError(f"{str(path)!r} is a file, not a folder")
        raise ValueError(f"{str(path)!r} cannot be made: {str(probe)!r} is a file")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ValueError(f"{str(path)!r} is not a writable folder: {e.strerror or e}") from None
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderInUse(ValueError):
    """Another process holds the folder's lock."""


@contextmanager
def exclusive_folder(folder: str | os.PathLike, lock_name: str = ".lock") -> Iterator[Path]:
    """Hold an exclusive lock on `folder` (made if needed) while inside: an flock on
    folder/lock_name, which holds the holder's pid. The lock goes with its process, even on
    SIGKILL; a second holder gets FolderInUse naming the folder and the first holder's pid."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / lock_name, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise FolderInUse(
                f"{folder} is in use by another process (pid {holder}, holding "
                f"{folder / lock_name}); wait for it to end or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield folder
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | os.PathLike, pattern: str = ".*.tmp") -> list[Path]:
    """Delete what `write_atomic` leaves when its process is killed mid-write (only safe while
    no one else writes in `folder`: hold its lock). Returns the files removed."""
    stale = [p for p in Path(folder).glob(pattern) if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
