"""Atomic file writes: a reader, or a crash at any moment, never sees half a file.

The data goes to a temporary file in the target's folder (the same file system), is flushed to disk,
and is renamed over the target with `os.replace`, which is atomic. A failed write removes its temporary
file. Temporary names start with a dot and keep the target's extension, so writers that pick the format
from the name (PIL, matplotlib, numpy) work, and listings of checkpoints and snapshots never match them.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path) -> Iterator[str]:
    """Yields a temporary path to write; when the block succeeds it becomes `path`. Creates the folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp" + os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path) -> None:
    """`torch.save(obj, path)`, atomically."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
