"""Atomic file writes: a reader, or a crash at any moment, never sees half a file.

The data goes to a temporary file in the target's folder (the same file system), is flushed to disk,
and is renamed over the target with `os.replace`, which is atomic. A failed write removes its temporary
file. Temporary names start with a dot, so listings of checkpoints and snapshots never match them, and
end with the target's extension or the `suffix` given: writers that pick the format from the name (PIL,
matplotlib) or append an extension (numpy's savez) need the right one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None) -> Iterator[str]:
    """Yields a temporary path to write; when the block succeeds it becomes `path`. Creates the folder.

    The temporary name ends with `suffix` (default: `path`'s own extension), e.g. ".png" for a PNG whose
    target name has none, or ".npz" for np.savez."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1] if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path)[:64] + ".", suffix=".tmp" + suffix)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would have given; mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename is None:
            e.filename = path  # a failed write names no file: name the target ("[Errno 28] ...: 'path'")
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every system)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def torch_save_file(obj, path) -> None:
    """`torch.save(obj, path)` through a Python file, so that a failed write raises the OSError behind it
    (ENOSPC for a full disk), not the RuntimeError ("unexpected pos ...") torch's zip writer raises."""
    import torch
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            cause = e.__context__
            while cause is not None and not isinstance(cause, OSError):
                cause = cause.__context__
            if cause is None:
                raise
            raise cause from e


def atomic_torch_save(obj, path) -> None:
    """`torch.save(obj, path)`, atomically."""
    with atomic_path(path) as tmp:
        torch_save_file(obj, tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
