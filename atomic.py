"""Atomic file writes: a reader, or a crash at any moment, never sees half a file; and the checked read
of what they wrote (`load_torch_file`), which names a damaged or untrusted file in one line.

The data goes to a temporary file in the target's folder (the same file system), is flushed to disk,
and is renamed over the target with `os.replace`, which is atomic. A failed write removes its temporary
file. Temporary names start with a dot, so listings of checkpoints and snapshots never match them, and
end with the target's extension or the `suffix` given: writers that pick the format from the name (PIL,
matplotlib) or append an extension (numpy's savez) need the right one.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import pickle
import re
import signal
import sys
import tempfile
import threading
import warnings
from typing import Iterator

import torch


@contextlib.contextmanager
def atomic_path(path, suffix: str | None = None, durable: bool = True) -> Iterator[str]:
    """Yields a temporary path to write; when the block succeeds it becomes `path`. Creates the folder.

    The temporary name ends with `suffix` (default: `path`'s own extension), e.g. ".png" for a PNG whose
    target name has none, or ".npz" for np.savez. `durable`: the file and the rename are on disk when the
    block ends (fsync); without it they are atomic but reach the disk when the system writes them back, or
    when `sync_files` is called on the path (a kill -9 loses nothing either way; a power cut may)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # "File exists" would not say which file is in the way
        blocker = folder
        while not os.path.exists(blocker):
            blocker = os.path.dirname(blocker)
        raise NotADirectoryError(errno.ENOTDIR, "a file stands where a folder should be", blocker) from None
    suffix = os.path.splitext(path)[1] if suffix is None else suffix
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=temp_prefix(path), suffix=".tmp" + suffix)
    except OSError as e:  # e.g. a read-only folder: name the file the user asked for, not the temporary
        e.filename = path
        raise
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would have given; mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, tmp):
            e.filename = path  # name the target ("[Errno 28] ...: 'path'"), never the temporary
        raise
    if durable:
        _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    with contextlib.suppress(OSError):  # make renames in it durable (not possible on every system)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sync_files(paths) -> None:
    """Makes files written with atomic_path(durable=False) durable: fsync each, then their folders."""
    folders = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        except FileNotFoundError:  # removed since: nothing to keep
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if folder not in folders:
            folders.append(folder)
    for folder in folders:
        _sync_folder(folder)


def temp_prefix(path) -> str:
    """How the temporary files of writes to `path` begin: "." + the target's name + "."."""
    return "." + os.path.basename(os.fspath(path))[:64] + "."


TEMP_RE = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")  # the names atomic_path gives its temporaries


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def torch_save_file(obj, path) -> None:
    """`torch.save(obj, path)` through a Python file, so that a failed write raises the OSError behind it
    (ENOSPC for a full disk), not the RuntimeError ("unexpected pos ...") torch's zip writer raises."""
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


def atomic_torch_save(obj, path, durable: bool = True) -> None:
    """`torch.save(obj, path)`, atomically (and `durable`: see atomic_path)."""
    with atomic_path(path, durable=durable) as tmp:
        torch_save_file(obj, tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


class DamagedFileError(ValueError):
    """A file that exists but cannot be used: empty, cut short, not in torch's format, or not trusted."""


def load_torch_file(path, what: str = "file"):
    """`torch.load(path, weights_only=True)` onto the CPU. A file that cannot be read raises DamagedFileError
    with one line naming it and saying why; `what` ("checkpoint", "EMA snapshot") names its kind."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses pickled objects other than tensors and plain containers: they could run code.
        raise DamagedFileError(f"{path} is not a trusted {what}: it holds Python objects that are not tensors, "
                               f"which are never loaded (unpickling them could run code); use a {what} written "
                               f"by this project") from None
    except OSError:
        raise  # missing or unreadable: the OSError names the file
    except Exception as e:  # noqa: BLE001 - torch reports a cut file as RuntimeError, EOFError, KeyError ...
        size = os.path.getsize(path)
        reason = "empty" if size == 0 else f"{size} bytes, cut short or not a torch file"
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        detail = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise DamagedFileError(f"{what} {path} is damaged ({reason}: {detail}); delete it, or restore it from "
                               f"a copy") from None


# ----------------------------------------------------------------------------------------------------
# A folder received from someone else must not be able to make a tool write outside it: the files a tool
# writes are opened without following a symbolic link (O_NOFOLLOW), and the tool first refuses a folder
# whose entries it writes are links (one line naming the entry, before any work). Atomic writes replace
# a link instead of following it, but a linked sub-folder (checkpoints/ -> elsewhere) would still receive
# them: refuse_links checks the folders too.


class LinkError(ValueError):
    """An entry of a run folder that a tool would write is a symbolic link: reported as one line."""


def nofollow_opener(path, flags):
    """`open(path, mode, opener=nofollow_opener)`: fails with ELOOP where `path` itself is a symbolic link."""
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


def refuse_links(folder, names) -> None:
    """LinkError if `folder`'s entry `name` (for each of `names`), or for a folder entry anything inside
    it, is a symbolic link. `folder` itself may be a link (where the user keeps it is the user's choice)."""
    folder = os.fspath(folder)
    for name in names:
        path = os.path.join(folder, name)
        found = path if os.path.islink(path) else None
        if found is None and os.path.isdir(path):
            for d, dirs, files in os.walk(path):  # (os.walk never descends into linked folders)
                linked = [n for n in sorted(dirs + files) if os.path.islink(os.path.join(d, n))]
                if linked:
                    found = os.path.join(d, linked[0])
                    break
        if found is not None:
            raise LinkError(f"{os.path.relpath(found, folder)} in {folder} is a symbolic link (to "
                            f"{os.readlink(found)}); a tool never writes through a link out of the folder: "
                            f"replace the link by a copy of what it points to, or remove it")


def check_output_file(path, option: str) -> None:
    """A file a tool will write at the end, checked before the work (ValueError, one line): not a folder,
    not under a file, in a folder it may write (created if missing)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{option} {path} is a folder; pass the path of a file to write")
    if os.path.islink(path):
        raise LinkError(f"{option} {path} is a symbolic link (to {os.readlink(path)}); pass a plain path")
    check_output_dir(os.path.dirname(os.path.abspath(path)), option, named=path)


def check_output_dir(folder, option: str, named=None) -> None:
    """A folder a tool will write into (created if missing), checked before the work: the nearest existing
    ancestor must be a folder this process may write (or the folder itself exists and is writable)."""
    folder = os.path.abspath(os.fspath(folder))
    named = folder if named is None else named
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{option} {named}: a file stands where a folder should be ({existing})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {named}: the folder {existing} is not writable (read-only); pass a path in "
                         f"a folder you may write")


# ----------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM in the tools that run long: one line, the partial outputs removed (atomic_path
# removes its temporary on any exception), exit status 128 + the signal.


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException: `except Exception` blocks let it through)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.code = 128 + signum
        self.name = signal_name(signum)

    def message(self, tool_said: str = "nothing was written") -> str:
        return f"error: interrupted ({self.name}); {tool_said}"


def signal_name(signum: int) -> str:
    """How an error line names the signal: Ctrl-C for SIGINT (what the user pressed), else SIGTERM etc."""
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class CatchSignals:
    """Within the block SIGINT and SIGTERM call self.caught(signum) (main thread only), and the previous
    handlers come back after it. Subclasses say what a signal does: raise Interrupted here, stop at the end of
    a step (training.StopSignal), start nothing more (ablate.StopOnSignal)."""

    def caught(self, signum: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        self._old = {s: signal.signal(s, lambda signum, frame: self.caught(signum))
                     for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class RaiseInterrupted(CatchSignals):
    def caught(self, signum: int) -> None:
        raise Interrupted(signum)


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise Interrupted (in the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with RaiseInterrupted():
        yield


def remove_stale_temporaries_of(paths) -> None:
    """Remove the temporaries that killed atomic writes of `paths` left next to them (call it where no
    other process writes those paths)."""
    for path in paths:
        folder, prefix = os.path.dirname(os.path.abspath(path)), temp_prefix(path)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(prefix) and TEMP_RE.match(name):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(folder, name))


def non_finite_entry(obj, where: str = "") -> str | None:
    """The path ("model/blocks.0.attn.weight") of the first floating tensor in nested dicts and lists `obj`
    that holds a NaN or an inf; None when all are finite. Weights loaded from a file are checked with it:
    a NaN in a snapshot would otherwise sample black images without a word."""
    if isinstance(obj, torch.Tensor):
        finite = not obj.is_floating_point() or bool(torch.isfinite(obj).all())
        return None if finite else (where or "a tensor")
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        found = non_finite_entry(value, f"{where}/{key}" if where else str(key))
        if found is not None:
            return found
    return None


def interruptible(said: str = "nothing was written"):
    """Decorates a tool's `main(argv) -> int`: SIGINT and SIGTERM end it with one line ("error: interrupted
    (SIGTERM); " + `said`) and exit status 128 + the signal; atomic writes under way remove their temporaries."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                with signals_interrupt():
                    return main(*args, **kwargs)
            except Interrupted as e:
                print(e.message(said), file=sys.stderr, flush=True)
                return e.code
        return run
    return wrap
