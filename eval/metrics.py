"""The metrics of the ADM evaluator besides FID: precision and recall (Kynkäänniemi et al. 2019) and the
Inception Score, computed from Inception features (eval/inception.py). sFID is eval.fid.frechet_distance on
the spatial features.

Precision/recall, as ADM's ManifoldEstimator with k = 3: each set's manifold is the union of balls around its
points whose radius is the distance to the point's k-th nearest neighbour within the set (the point itself not
counted). Precision = fraction of samples inside the reference manifold, recall = fraction of reference points
inside the samples' manifold. Distances are squared Euclidean, computed blockwise (rows × all columns), so the
memory is `block` × N, not N × N. ADM first tries float16 distances and falls back to float32 when they overflow;
here they are float32 on a GPU and float64 on the CPU, which only removes rounding.

Inception Score, as ADM: softmax of the 1008 logits, then for each split of `split_size` (5,000) images
exp(mean KL(p(y|x) ‖ p(y))), averaged over the splits (10 splits for the 50,000 images of the ADM protocol).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import log_softmax, logsumexp

NEIGHBOURS = 3
IS_SPLIT_SIZE = 5000


def _as_tensor(feats, device) -> torch.Tensor:
    dtype = torch.float32 if torch.device(device).type == "cuda" else torch.float64
    return torch.as_tensor(np.asarray(feats), device=device).to(dtype)


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a_i − b_j‖² = ‖a_i‖² − 2 a_i·b_j + ‖b_j‖², clamped at 0 against round-off."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp_(min=0)


def manifold_radii(feats: torch.Tensor, k: int = NEIGHBOURS, block: int = 2048) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest neighbour in the same set (itself excluded)."""
    if len(feats) <= k:
        raise ValueError(f"precision/recall with k = {k} need more than {k} points per set, got {len(feats)}")
    radii = [torch.kthvalue(squared_distances(feats[i: i + block], feats), k + 1, dim=1).values
             for i in range(0, len(feats), block)]  # the (k+1)-th smallest: the point itself is the first
    return torch.cat(radii)


def coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """For each point: is it inside some ball (centre, squared radius)? Boolean (N,)."""
    inside = [(squared_distances(points[i: i + block], centres) <= radii[None]).any(1)
              for i in range(0, len(points), block)]
    return torch.cat(inside)


def precision_recall(reference, samples, k: int = NEIGHBOURS, device="cpu", block: int = 2048) -> tuple[float, float]:
    """(precision, recall) of N×D sample features against M×D reference features."""
    ref, fake = _as_tensor(reference, device), _as_tensor(samples, device)
    if ref.ndim != 2 or fake.ndim != 2 or ref.shape[1] != fake.shape[1]:
        raise ValueError(f"features must be N x D with the same D, got {tuple(ref.shape)} and {tuple(fake.shape)}")
    ref_radii, fake_radii = manifold_radii(ref, k, block), manifold_radii(fake, k, block)
    precision = coverage(fake, ref, ref_radii, block).double().mean().item()
    recall = coverage(ref, fake, fake_radii, block).double().mean().item()
    return precision, recall


def inception_score(logits, split_size: int = IS_SPLIT_SIZE) -> float:
    """exp(E_x KL(p(y|x) ‖ p(y))) per split of `split_size` images (p(y) the split's mean), averaged."""
    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)  # in logs: no 0 · log 0 for unused classes
    scores = []
    for i in range(0, len(log_p), split_size):
        part = log_p[i: i + split_size]
        log_marginal = logsumexp(part, axis=0, keepdims=True) - np.log(len(part))
        kl = (np.exp(part) * (part - log_marginal)).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))
