import json
import os

import numpy as np
import pytest
import torch
from PIL import Image


import data as D
import prepare_latents
from helpers import save_tiny_vae

BLOCKS = (8, 16)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae", BLOCKS)


def _images(root, per_class=3, classes=("a", "b", "c")):
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(classes):
        os.makedirs(root / cls, exist_ok=True)
        for i in range(per_class):
            w, h = 32 + 8 * i, 40 - 4 * i  # non-square: exercises the centre crop
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_prepare_and_load_roundtrip(tmp_path, tiny_vae_dir, capsys):
    _images(tmp_path / "imgs")
    out = tmp_path / "lat"
    rc = prepare_latents.main(["--data-path", str(tmp_path / "imgs"), "--out", str(out), "--image-size", "32",
                               "--vae", tiny_vae_dir, "--batch-size", "4", "--device", "cpu"])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["labels.pt", "meta.json", "posterior_means.pt", "posterior_stds.pt", "stats.pt"]
    res = 32 // 2 ** (len(BLOCKS) - 1)
    means = torch.load(out / "posterior_means.pt", weights_only=True)
    stds = torch.load(out / "posterior_stds.pt", weights_only=True)
    st = torch.load(out / "stats.pt", weights_only=True)
    assert means.shape == stds.shape == (9, 4, res, res) and means.dtype == torch.float32
    assert (stds > 0).all()
    assert torch.load(out / "labels.pt", weights_only=True).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert isinstance(st["mean"], torch.Tensor) and st["mean"].shape == (4,)  # reference layout
    exp = D.mixture_stats(means, stds)
    assert torch.allclose(st["mean"], exp["mean"]) and torch.allclose(st["std"], exp["std"])
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vae"] == os.path.abspath(tiny_vae_dir) and meta["image_size"] == 32
    assert meta["class_names"] == ["a", "b", "c"]

    ds = D.load_dataset(str(out))
    assert (ds.kind, len(ds), ds.channels, ds.resolution, ds.num_classes) == ("latent", 9, 4, res, 3)
    assert ds.vae == os.path.abspath(tiny_vae_dir) and ds.class_names == ["a", "b", "c"]
    x, y = ds[4]
    assert x.shape == (4, res, res) and int(y) == 1

    # the posterior mean matches encoding the centre-cropped image directly
    vae = D.load_vae(ds.vae, "cpu")
    img = D.load_image(str(tmp_path / "imgs" / "b" / "1.png"), 32)
    with torch.no_grad():
        mu = vae.encode(img[None]).latent_dist.mean
    assert torch.allclose(mu[0], means[4], atol=1e-4)

    # decode: denormalise with the stats, then vae.decode (no 0.18215 factor)
    z = torch.stack([ds[i][0] for i in range(3)])
    pix = D.decode_latents(vae, z, ds.stats)
    assert pix.shape == (3, 3, 32, 32) and pix.dtype == torch.float32
    with torch.no_grad():
        ref = vae.decode(D.denormalize(z, ds.stats)).sample
    assert torch.allclose(pix, ref, atol=1e-5)
    pix2 = D.decode_samples(z, ds.describe(), vae=vae)
    assert torch.allclose(pix2, ref, atol=1e-5)
    assert D.to_uint8_images(pix).shape == (3, 32, 32, 3)

    # refuses to overwrite without --overwrite; one-line error, exit 2
    capsys.readouterr()
    rc = prepare_latents.main(["--data-path", str(tmp_path / "imgs"), "--out", str(out), "--image-size", "32",
                               "--vae", tiny_vae_dir, "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--overwrite" in err and len(err.splitlines()) == 1


def test_full_disk_writes_none_of_the_files(tmp_path, tiny_vae_dir, capsys, monkeypatch):
    """The third tensor file written hits a full disk: one error line, and the folder holds no latent file
    and no temporary file (all five are renamed into place only when all are written)."""
    import errno
    _images(tmp_path / "imgs")
    original, calls = torch.save, {"n": 0}

    def full_on_third(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_on_third)
    out = tmp_path / "lat"
    capsys.readouterr()
    rc = prepare_latents.main(["--data-path", str(tmp_path / "imgs"), "--out", str(out), "--image-size", "32",
                               "--vae", tiny_vae_dir, "--device", "cpu"])
    err = capsys.readouterr().err.splitlines()[-1]  # (after the progress bar)
    assert rc == 2 and err == f"error: [Errno 28] No space left on device: '{out / 'posterior_stds.pt'}'"
    assert os.listdir(out) == []


def test_prepare_errors(tmp_path, tiny_vae_dir, capsys):
    def run(*extra):
        capsys.readouterr()
        rc = prepare_latents.main(["--out", str(tmp_path / "o"), "--image-size", "32", "--device", "cpu", *extra])
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return rc, err

    rc, err = run("--data-path", str(tmp_path / "missing"), "--vae", tiny_vae_dir)
    assert rc == 2 and err.startswith(f"error: data path not found: {tmp_path / 'missing'} (expected ")
    (tmp_path / "empty").mkdir()
    rc, err = run("--data-path", str(tmp_path / "empty"), "--vae", tiny_vae_dir)
    assert rc == 2 and err.startswith(f"error: data folder {tmp_path / 'empty'} is empty; ")  # (not just the name)
    _images(tmp_path / "imgs", per_class=1, classes=("a",))
    rc, err = run("--data-path", str(tmp_path / "imgs"), "--vae", str(tmp_path / "no-vae"))
    assert rc == 2 and "VAE folder not found" in err
    assert not (tmp_path / "o").exists()
