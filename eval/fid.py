"""Fréchet Inception Distance (FID) between two image sets or precomputed statistics: the library.

Its command line is the evaluator's (``python -m eval.evaluate A B --metrics fid [--save-samples A_stats.npz]``,
docs/evaluate.md); this module has none, so that one tool reads the inputs, checks them and prints the numbers.

An FID input is each one of

* an images ``.npz`` with key ``arr_0``: uint8 N×H×W×3 (the ADM evaluator's format; N×H×W or N×H×W×1 grayscale is
  repeated to 3 channels);
* a folder of images (``.png``/``.jpg``/``.jpeg``/``.bmp``/``.webp``, sorted by name, converted to RGB, all the same
  size), or an ImageFolder whose images sit in class sub-folders (read recursively, sorted by path);
* a statistics ``.npz`` with keys ``mu`` (D) and ``sigma`` (D×D), as in the ADM reference batches (when a file has
  both ``mu``/``sigma`` and ``arr_0``, the precomputed statistics are used, as the ADM evaluator does);
* in memory, a uint8 image array or tensor, or a ``(mu, sigma)`` tuple.

Images go through the TF 2015-12-05 FID Inception-v3 (``eval/inception.py``; pool3, 2048 features). Unusable
inputs (missing file, unusable ``.npz``, image sizes that differ between the two sets, fewer than 2 images) raise
:class:`FIDError` (a ValueError) with one line naming the problem.

    from eval.fid import frechet_distance, compute_statistics, fid_from_images
"""

from __future__ import annotations

import os
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

if __name__ == "__main__":  # (python eval/fid.py or python -m eval.fid: the command it was)
    print("error: eval/fid.py is a library; the FID command line is, from the repository root: "
          "python -m eval.evaluate A B --metrics fid", file=sys.stderr)
    sys.exit(2)

import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402
from PIL import Image  # noqa: E402

import limits  # noqa: E402
from atomic import atomic_path  # noqa: E402
from eval.inception import (  # noqa: E402
    InceptionFeatureExtractor,
    InceptionWeightsError,
    compute_features,
    load_inception,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAG_ATOL = 1e-3  # largest |imaginary part| on the diagonal of sqrtm(Σ1Σ2) that is treated as round-off

__all__ = [
    "FIDError",
    "InceptionWeightsError",
    "frechet_distance",
    "statistics_from_features",
    "load_images",
    "load_statistics",
    "npz_name",
    "open_npz",
    "check_exists",
    "check_statistics",
    "check_same_size",
    "normalise_images",
    "save_statistics",
    "load_source",
    "compute_statistics",
    "fid_from_images",
]


class FIDError(ValueError):
    """A user-facing problem with the FID inputs (the CLI prints it as one line and exits with status 2)."""


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # scipy warns "Matrix is singular ..." for the (common) rank-deficient products; handled by the caller.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        return scipy.linalg.sqrtm(a)


def _max_diag_imag(m: np.ndarray) -> float:
    return float(np.max(np.abs(np.diagonal(m).imag))) if np.iscomplexobj(m) else 0.0


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (Σ1 Σ2)^{1/2} = Σ sqrt(eig(Σ1^{1/2} Σ2 Σ1^{1/2})): Σ1 Σ2 is similar to that symmetric PSD matrix."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    if w.min() < -1e-6 * max(abs(w).max(), 1e-12):
        raise FIDError(f"sigma1 is not positive semi-definite (smallest eigenvalue {w.min():.3g})")
    r1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = r1 @ sigma2 @ r1
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    if lam.min() < -1e-6 * max(abs(lam).max(), 1e-12):
        raise FIDError(f"sigma2 is not positive semi-definite (eigenvalue {lam.min():.3g} of S1^1/2 S2 S1^1/2)")
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "eigh") -> float:
    """``‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})`` in float64.

    ``method="eigh"`` (default) computes the trace from two symmetric eigendecompositions: ``tr (Σ1Σ2)^{1/2}`` is
    the sum of the square roots of the eigenvalues of ``Σ1^{1/2} Σ2 Σ1^{1/2}`` (similar to ``Σ1Σ2``, and symmetric
    PSD; round-off negatives clipped to 0). Well defined for singular covariances, equal to sqrtm's value to
    ~1e-10 relative, and 4x faster on a CPU for 2048x2048; above all it does not collapse when several processes
    share the cores: ten concurrent sqrtm's with all cores' BLAS threads each stalled the one-GPU ablation for
    minutes (benchmarks/fid_threads.py, RESULTS.md).

    ``method="sqrtm"`` (the computation of pytorch-fid and the ADM evaluator) uses ``scipy.linalg.sqrtm``:

    * the square root of a product of PSD matrices has real eigenvalues; round-off gives ``sqrtm`` a tiny
      imaginary part, which is discarded;
    * if the product is singular enough that ``sqrtm`` fails — a non-finite result, or a diagonal imaginary part
      above ``IMAG_ATOL`` (1e-3) — ``eps·I`` is added to *both* covariances inside the square root (the traces
      ``tr Σ1 + tr Σ2`` stay those of the inputs, as in pytorch-fid) and it is recomputed, with a warning; if the
      imaginary part is still large after that, :class:`FIDError` is raised.
    """
    if method not in ("sqrtm", "eigh"):
        raise FIDError(f"unknown method {method!r} (use 'sqrtm' or 'eigh')")
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise FIDError(f"mean vectors have different or invalid shapes: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise FIDError(f"covariances must be {d}x{d}, got {sigma1.shape} and {sigma2.shape}")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise FIDError(f"{name} contains non-finite values")

    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all() or _max_diag_imag(covmean) > IMAG_ATOL:
        warnings.warn(
            f"FID: sqrtm(sigma1 @ sigma2) is not usable (singular product); adding {eps:g}*I to both covariances",
            RuntimeWarning,
            stacklevel=2,
        )
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise FIDError("sqrtm(sigma1 @ sigma2) is not finite even with a diagonal offset")
    if np.iscomplexobj(covmean):
        imag = _max_diag_imag(covmean)
        if imag > IMAG_ATOL:
            raise FIDError(f"sqrtm(sigma1 @ sigma2) has a large imaginary component ({imag:.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def statistics_from_features(feats) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D) and covariance (D×D, ``np.cov(rowvar=False)``, i.e. N−1 normalised) of N×D features, float64."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2:
        raise FIDError(f"features must be N x D, got shape {feats.shape}")
    if feats.shape[0] < 2:
        raise FIDError(f"need at least 2 images to estimate a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def check_exists(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or folder: {p}")
    return p


def normalise_images(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise FIDError(f"{where}: images must be uint8 (0..255), got {arr.dtype}")
    if arr.ndim == 3:  # N×H×W grayscale
        arr = np.repeat(arr[..., None], 3, axis=-1)
    elif arr.ndim == 4 and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise FIDError(f"{where}: images must be N x H x W x 3 (or N x H x W grayscale), got shape {arr.shape}")
    return arr


def _image_files(folder: Path) -> list[Path]:
    """The folder's images; if it has none of its own, those of its sub-folders (an ImageFolder's classes)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if files:
        return files
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_images(path) -> np.ndarray:
    """uint8 N×H×W×3 images from an ``.npz`` (key ``arr_0``) or a folder of image files."""
    p = check_exists(path)
    if p.is_dir():
        files = _image_files(p)
        if not files:
            raise FIDError(f"{p}: folder contains no images ({', '.join(IMAGE_EXTENSIONS)}), neither directly "
                           "nor in class sub-folders")
        images = []
        for f in files:
            try:
                with Image.open(f) as im:
                    a = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
                raise FIDError(f"{f}: not a readable image ({e})") from None
            if images and a.shape != images[0].shape:
                raise FIDError(
                    f"{p}: images differ in size: {files[0].name} is {images[0].shape[1]}x{images[0].shape[0]}, "
                    f"{f.name} is {a.shape[1]}x{a.shape[0]}"
                )
            images.append(a)
        return np.stack(images)
    with open_npz(p) as z:
        if "arr_0" not in z.files:
            raise FIDError(f"{p}: no 'arr_0' (images) in this .npz (keys: {', '.join(z.files) or 'none'})")
        return normalise_images(read_array(z, "arr_0", p), str(p))


def open_npz(p: Path):
    """An open NpzFile; a .npy, a truncated or a non-zip file is a one-line FIDError."""
    try:
        z = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise FIDError(f"{p}: not a readable .npz file ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise FIDError(f"{p}: is a single .npy array, not an .npz; save images with np.savez(path, arr_0=images) "
                       "or statistics with keys mu and sigma")
    return z


def check_array_header(z, key: str, p) -> None:
    """What the header of member `key` claims (shape, dtype), checked before numpy allocates it: no more
    bytes than the member holds, and no more than this machine's memory."""
    try:
        info = z.zip.getinfo(key + ".npy")
        with z.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error):
        return  # (reading the array then names what is wrong)
    if dtype.hasobject:
        return
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > info.file_size:
        raise FIDError(f"{p}: the header of '{key}' claims an array of shape {tuple(shape)} ({nbytes:,} bytes), but "
                       f"the file holds {info.file_size:,}; it is damaged or not what it says")
    limits.check_fits(nbytes, f"{p}: '{key}' of shape {tuple(shape)}", "evaluate fewer images at once", FIDError)


def read_array(z, key: str, p) -> np.ndarray:
    """z[key], with a cut or pickled member reported as one FIDError line (its header checked first)."""
    check_array_header(z, key, p)
    try:
        return z[key]
    except ValueError as e:  # object arrays need pickle, which is never allowed here
        raise FIDError(f"{p}: '{key}' is not a plain numeric array ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise FIDError(f"{p}: '{key}' cannot be read; the file is damaged or truncated ({e})") from None


def check_statistics(mu, sigma, where: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    for name, a in (("mu", mu), ("sigma", sigma)):
        if a.dtype.kind not in "fiu":
            raise FIDError(f"{where}: {name} must be numbers, got an array of dtype {a.dtype}")
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FIDError(f"{where}: mu must be D and sigma D x D, got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FIDError(f"{where}: the statistics contain non-finite values")
    return mu, sigma


def load_statistics(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an ``.npz`` with keys ``mu`` and ``sigma`` (e.g. an ADM reference batch)."""
    p = check_exists(path)
    if p.is_dir():
        raise FIDError(f"{p}: is a folder, not a statistics .npz")
    with open_npz(p) as z:
        if "mu" not in z.files or "sigma" not in z.files:
            raise FIDError(f"{p}: no 'mu'/'sigma' statistics in this .npz (keys: {', '.join(z.files) or 'none'})")
        return check_statistics(read_array(z, "mu", p), read_array(z, "sigma", p), str(p))


def npz_name(path) -> str:
    """The file np.savez writes for `path`: `.npz` appended where it is missing (check and name this one)."""
    return str(path) if str(path).endswith(".npz") else f"{path}.npz"


def save_statistics(path, mu, sigma, **extra) -> None:
    """Save ``mu``/``sigma`` (float64) to an ``.npz`` readable by :func:`load_statistics` and the ADM evaluator."""
    mu, sigma = check_statistics(mu, sigma, str(path))
    with atomic_path(npz_name(path), suffix=".npz") as tmp:  # a cached reference is never half written
        np.savez(tmp, mu=mu, sigma=sigma, **extra)


def load_source(path) -> tuple[str, object]:
    """Open one FID input: ``("stats", (mu, sigma))`` or ``("images", uint8 N×H×W×3)``.

    A folder is images; an ``.npz`` with ``mu`` and ``sigma`` is statistics (preferred if ``arr_0`` is also there);
    an ``.npz`` with ``arr_0`` is images; anything else raises :class:`FIDError` / FileNotFoundError.
    """
    p = check_exists(path)
    if p.is_dir():
        return "images", load_images(p)
    with open_npz(p) as z:
        keys = set(z.files)
    if {"mu", "sigma"} <= keys:
        return "stats", load_statistics(p)
    if "arr_0" in keys:
        return "images", load_images(p)
    raise FIDError(
        f"{p}: .npz has neither 'arr_0' (images) nor 'mu'/'sigma' (statistics); keys: {', '.join(sorted(keys)) or 'none'}"
    )


def _is_stats(obj) -> bool:
    if isinstance(obj, dict) or hasattr(obj, "files"):
        return "mu" in obj and "sigma" in getattr(obj, "files", obj)
    return isinstance(obj, tuple) and len(obj) == 2


def _as_source(obj, name: str) -> tuple[str, object]:
    """Path / uint8 image array or tensor / (mu, sigma) tuple / dict with mu, sigma -> (kind, payload)."""
    if isinstance(obj, (str, os.PathLike)):
        return load_source(obj)
    if _is_stats(obj):
        if isinstance(obj, tuple):
            return "stats", check_statistics(obj[0], obj[1], name)
        return "stats", check_statistics(obj["mu"], obj["sigma"], name)
    if hasattr(obj, "detach"):  # torch tensor
        obj = obj.detach().cpu().numpy()
    return "images", normalise_images(np.asarray(obj), name)


def _image_size(images) -> tuple[int, int]:
    return int(images.shape[1]), int(images.shape[2])


def _fmt_size(hw: tuple[int, int]) -> str:
    return f"{hw[1]}x{hw[0]}"


def check_same_size(a, b, name_a: str = "A", name_b: str = "B") -> None:
    if _image_size(a) != _image_size(b):
        raise FIDError(
            f"image sizes differ: {name_a} is {_fmt_size(_image_size(a))} but {name_b} is {_fmt_size(_image_size(b))} "
            "(FID compares sets at one resolution)"
        )


def _check_count(images, name: str) -> None:
    if len(images) < 2:
        raise FIDError(f"{name}: need at least 2 images to estimate a covariance, got {len(images)}")


def _check_pair(kind_a, a, name_a: str, kind_b, b, name_b: str) -> None:
    """Both inputs usable, checked before any Inception work: same image size, at least 2 images each."""
    if kind_a == "images" and kind_b == "images":
        check_same_size(a, b, name_a, name_b)
    for kind, payload, name in ((kind_a, a, name_a), (kind_b, b, name_b)):
        if kind == "images":
            _check_count(payload, name)


class _LazyExtractor:
    """Loads the Inception network only when images actually need features."""

    def __init__(self, extractor, inception_weights, device):
        self._extractor, self._weights, self._device = extractor, inception_weights, device

    def get(self) -> InceptionFeatureExtractor:
        if self._extractor is None:
            self._extractor = load_inception(self._weights, device=self._device)
        return self._extractor


def _stats_of(kind, payload, name, lazy: _LazyExtractor, batch_size, device, progress):
    if kind == "stats":
        return payload
    _check_count(payload, name)
    feats = compute_features(payload, lazy.get(), batch_size=batch_size, device=device, progress=progress)
    return statistics_from_features(feats)


def compute_statistics(
    path,
    extractor: InceptionFeatureExtractor | None = None,
    batch_size: int = 100,
    device="auto",
    progress: bool = True,
    inception_weights=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a FID input: a stats ``.npz`` is read, images (``.npz``/folder/uint8 array) go through Inception.

    ``extractor`` defaults to :func:`eval.inception.load_inception` (``inception_weights``) loaded on ``device``.
    """
    name = str(path) if isinstance(path, (str, os.PathLike)) else "images"
    kind, payload = _as_source(path, name)
    lazy = _LazyExtractor(extractor, inception_weights, device)
    return _stats_of(kind, payload, name, lazy, batch_size, device, progress)


def fid_from_images(
    images_a,
    images_b_or_stats,
    extractor: InceptionFeatureExtractor | None = None,
    batch_size: int = 100,
    device="auto",
    progress: bool = True,
    inception_weights=None,
    eps: float = 1e-6,
    method: str | None = None,
) -> float:
    """FID between ``images_a`` (uint8 N×H×W×3 array/tensor, or a path) and ``images_b_or_stats`` (the same kinds,
    a ``(mu, sigma)`` tuple, or a dict / npz with ``mu`` and ``sigma``). Two image sets must have the same size."""
    kind_a, a = _as_source(images_a, "A")
    kind_b, b = _as_source(images_b_or_stats, "B")
    _check_pair(kind_a, a, "A", kind_b, b, "B")
    lazy = _LazyExtractor(extractor, inception_weights, device)
    mu1, s1 = _stats_of(kind_a, a, "A", lazy, batch_size, device, progress)
    mu2, s2 = _stats_of(kind_b, b, "B", lazy, batch_size, device, progress)
    return frechet_distance(mu1, s1, mu2, s2, eps=eps, method=fid_method(method))


def fid_method(method: str | None = None) -> str:
    """`method`, else MAPDIT_FID_METHOD, else eigh (MAPDIT_FID_METHOD=sqrtm: pytorch-fid's route, the same
    distance)."""
    return method or os.environ.get("MAPDIT_FID_METHOD", "eigh")
