"""FD-DINOv2 (eval/dinov2.py, eval/evaluate.py --fd-dinov2) as EDM2 computes it, with a small random network of
DINOv2's interface (float N×3×224×224 in, N×D features out) in place of ViT-L/14, which is never downloaded:
the preprocessing is EDM2's, the distance equals an independent float64 computation with scipy, and
without weights the error is one line."""
import json
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from eval import dinov2, evaluate


class _TinyDINO(torch.nn.Module):
    """DINOv2's interface: a normalised 224×224 batch in, one feature vector per image out (16 numbers)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, kernel_size=14, stride=14)  # (patches of 14, as ViT-L/14)
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, x):
        if x.shape[1:] != (3, 224, 224):
            raise RuntimeError("expected N x 3 x 224 x 224")
        return self.proj(torch.tanh(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture
def tiny_dino(tmp_path):
    path = tmp_path / "tiny_dino.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_TinyDINO()).save(str(path))
    return str(path)


def images(seed, n=48, size=12):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_preprocessing_is_edm2s_resize_scale_and_imagenet_normalisation():
    grey = np.full((2, 10, 10, 3), 51, dtype=np.uint8)  # a constant image stays constant through the resize
    x = dinov2.preprocess(grey)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    want = [(0.2 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)).numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(x.std(dim=(0, 2, 3)).numpy(), 0, atol=1e-4)


def independent_fd(a: np.ndarray, b: np.ndarray, network) -> float:
    """EDM2's recipe written out again (torch's bicubic with antialias to 224, /255, ImageNet mean/std), and
    the Fréchet distance in float64 with scipy's sqrtm."""
    def features(imgs):
        x = torch.nn.functional.interpolate(torch.tensor(imgs).permute(0, 3, 1, 2).double(), size=(224, 224),
                                            mode="bicubic", antialias=True) / 255.0
        x = (x - torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)) \
            / torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
        with torch.no_grad():
            return network(x.float()).double().numpy()
    fa, fb = features(a), features(b)
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sa, sb = np.cov(fa, rowvar=False, ddof=1), np.cov(fb, rowvar=False, ddof=1)
    covmean = scipy.linalg.sqrtm(sa @ sb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


def test_fd_dinov2_equals_an_independent_float64_computation(tiny_dino):
    network = dinov2.load_dinov2(tiny_dino)
    a, b = images(1), images(2)
    got = dinov2.fd_dinov2(dinov2.dinov2_features(a, network, batch_size=20, progress=False),
                           dinov2.dinov2_features(b, network, batch_size=20, progress=False))
    want = independent_fd(a, b, network)
    assert want > 0 and got == pytest.approx(want, rel=1e-4)
    same = dinov2.dinov2_features(a, network, progress=False)
    assert dinov2.fd_dinov2(same, same) == pytest.approx(0, abs=1e-6)


def test_evaluate_reports_fd_dinov2_in_its_table_and_json(tiny_dino, tmp_path, capsys, monkeypatch):
    from test_sample import stub_inception
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, arr_0=images(1))
    np.savez(b, arr_0=images(2))
    out = tmp_path / "m.json"
    assert evaluate.main([str(a), str(b), "--fd-dinov2", "--dinov2-weights", tiny_dino, "--device", "cpu",
                          "--inception-weights", str(stub_inception(tmp_path / "inc.pt")), "--no-progress",
                          "--json", str(out), "--method", "eigh"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    want = independent_fd(images(1), images(2), dinov2.load_dinov2(tiny_dino))
    assert last.startswith("FD-DINOv2: ") and float(last.split()[1]) == pytest.approx(want, rel=1e-4)
    assert json.load(open(out))["fd_dinov2"] == pytest.approx(want, rel=1e-4)


def test_without_weights_fd_dinov2_is_one_error_line_and_nothing_is_downloaded(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # an empty cache
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("tried to load from the hub"))
    a = tmp_path / "a.npz"
    np.savez(a, arr_0=images(1, n=4))
    assert evaluate.main([str(a), str(a), "--fd-dinov2", "--device", "cpu"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: FD-DINOv2 needs the DINOv2 ViT-L/14 weights") and "--dinov2-weights" in line
