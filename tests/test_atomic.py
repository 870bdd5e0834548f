"""atomic.py: a write either replaces the file whole or leaves it exactly as it was."""
import os

import numpy as np
import pytest
import torch

import atomic
from atomic import atomic_path, atomic_torch_save, atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("half of the new cont")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


def test_writers_that_pick_the_format_from_the_name(tmp_path):
    """np.savez appends .npz unless the name ends with it; the temporary name keeps the extension."""
    with atomic_path(tmp_path / "stats.npz") as tmp:
        assert tmp.endswith(".npz") and os.path.basename(tmp).startswith(".stats.npz.")
        np.savez(tmp, mu=np.arange(3))
    assert np.load(tmp_path / "stats.npz")["mu"].tolist() == [0, 1, 2]
    atomic_torch_save({"w": torch.ones(2)}, tmp_path / "sub" / "0000001.pt")  # creates the folder
    assert torch.load(tmp_path / "sub" / "0000001.pt", weights_only=True)["w"].tolist() == [1.0, 1.0]
    assert sorted(os.listdir(tmp_path)) == ["stats.npz", "sub"]
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(tmp_path / "stats.npz").st_mode & 0o777 == 0o666 & ~mask  # as open() would; not 0600


def test_target_without_extension_gets_the_writers_suffix(tmp_path):
    """np.savez on a name without .npz would write a second file; the suffix keeps it on the temporary."""
    with atomic_path(tmp_path / "samples", suffix=".npz") as tmp:
        assert tmp.endswith(".npz")
        np.savez(tmp, arr_0=np.ones(2))
    assert np.load(tmp_path / "samples")["arr_0"].tolist() == [1.0, 1.0]
    assert os.listdir(tmp_path) == ["samples"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and permission to mount; skipped elsewhere)."""
    import subprocess
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_raises_enospc_and_keeps_the_old_checkpoint(tiny_disk):
    import errno
    target = tiny_disk / "0000001.pt"
    atomic_torch_save({"w": torch.ones(8)}, target)
    with pytest.raises(OSError) as info:
        atomic_torch_save({"w": torch.zeros(1 << 20)}, target)  # 4 MiB on a 1 MiB disk
    # not torch's RuntimeError("unexpected pos ..."), and the message names the file
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert str(info.value) == f"[Errno 28] No space left on device: '{target}'"
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(8))
    assert os.listdir(tiny_disk) == ["0000001.pt"]


def test_torch_save_file_full_disk_is_enospc_without_root():
    import errno
    from atomic import torch_save_file
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with pytest.raises(OSError) as info:
        torch_save_file({"w": torch.zeros(1 << 20)}, "/dev/full")
    assert info.value.errno == errno.ENOSPC


def test_other_os_errors_keep_their_type_and_message(tmp_path):
    with pytest.raises(TimeoutError, match="^slow disk$"):
        with atomic_path(tmp_path / "a.txt"):
            raise TimeoutError("slow disk")
    assert os.listdir(tmp_path) == []


def test_an_error_that_names_the_temporary_names_the_target_instead(tmp_path, monkeypatch):
    import errno
    import tempfile
    target = tmp_path / "loss.png"
    with pytest.raises(OSError) as info:  # a writer (PIL, torch) failing on the file it was given
        with atomic_path(target) as tmp:
            raise OSError(errno.EIO, "Input/output error", tmp)
    assert str(info.value) == f"[Errno 5] Input/output error: '{target}'"

    def no_room_for_a_temporary(dir, prefix, suffix):  # e.g. a read-only folder, or no inodes left
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "x1y2" + suffix))
    monkeypatch.setattr(tempfile, "mkstemp", no_room_for_a_temporary)
    with pytest.raises(PermissionError) as info:
        atomic_write_text(target, "x")
    assert str(info.value) == f"[Errno 13] Permission denied: '{target}'"


def _malicious(path):
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo this must never run",))
    torch.save({"model": RunsCode()}, path)


@pytest.mark.parametrize("damage, message", [
    (lambda p: os.truncate(p, os.path.getsize(p) // 2), r"^checkpoint .*0000020.pt is damaged \(\d+ bytes, cut short"),
    (lambda p: os.truncate(p, 0), r"^checkpoint .*0000020.pt is damaged \(empty"),
    (_malicious, r"^.*0000020.pt is not a trusted checkpoint: .*could run code"),
])
def test_load_torch_file_names_a_damaged_or_untrusted_file_in_one_line(tmp_path, damage, message):
    from atomic import DamagedFileError, load_torch_file
    path = tmp_path / "0000020.pt"
    atomic_torch_save({"w": torch.arange(1000.0)}, path)
    assert torch.equal(load_torch_file(path, "checkpoint")["w"], torch.arange(1000.0))
    damage(path)
    # before: RuntimeError ("PytorchStreamReader failed ..."), EOFError, or UnpicklingError telling the user
    # to retry with weights_only=False
    with pytest.raises(DamagedFileError, match=message) as info:
        load_torch_file(path, "checkpoint")
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


def test_a_file_where_the_folder_should_be_is_named_as_such(tmp_path):
    (tmp_path / "results").write_text("a file")
    with pytest.raises(NotADirectoryError) as info:  # before: FileExistsError "File exists"
        atomic_write_text(tmp_path / "results" / "config.json", "{}")
    assert str(info.value) == f"[Errno 20] a file stands where a folder should be: '{tmp_path / 'results'}'"


def _count_fsyncs(monkeypatch) -> list:
    synced = []
    real = atomic.os.fsync
    def fsync(fd):  # records which file or folder each fsync reached
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real(fd)
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    return synced


def test_a_write_that_is_not_durable_is_atomic_and_synced_later_by_sync_files(tmp_path, monkeypatch):
    synced = _count_fsyncs(monkeypatch)
    path = tmp_path / "ema" / "ema-0.050-0000001.pt"
    atomic.atomic_torch_save({"step": 1}, path, durable=False)
    assert torch.load(path, weights_only=True) == {"step": 1} and synced == []
    atomic.sync_files([str(path), str(tmp_path / "ema" / "removed-since.pt")])
    assert synced == [str(path.resolve()), str(path.parent.resolve())]  # the file, then its folder


def test_a_checkpoint_first_syncs_the_snapshots_written_since_the_last_one(tmp_path, monkeypatch):
    from phema import PowerEMA
    from helpers import tiny_dit
    from runs import Run
    run, ema = Run(str(tmp_path), rank=0), PowerEMA(tiny_dit(), stds=[0.05, 0.1])
    synced = _count_fsyncs(monkeypatch)
    run.save_snapshots(ema, 1)
    run.save_snapshots(ema, 2)
    assert synced == []  # four snapshot files, none synced yet
    run.save_checkpoint({"step": 2})
    snapshots = sorted(str(p.resolve()) for p in (tmp_path / "ema").iterdir())
    assert sorted(synced[:4]) == snapshots and synced[4] == str((tmp_path / "ema").resolve())
    assert str((tmp_path / "checkpoints" / "0000002.pt").resolve()) not in synced[:5]  # the checkpoint after them
    assert run.unsynced == []
