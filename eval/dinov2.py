"""FD-DINOv2, the metric EDM2 reports next to FID: the Fréchet distance between the DINOv2 ViT-L/14 features
of two image sets (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics").

As EDM2 computes it (its DINOv2 detector, after dgm-eval): uint8 images resized to 224×224 (bicubic, with
antialiasing, on the 0..255 values), scaled to [0, 1], normalised with the ImageNet mean and std, then the
network's output (the final-norm CLS token, 1,024 numbers); the distance is FID's formula on the features'
mean and covariance (eval/fid.py).

The weights are never downloaded here: a TorchScript file or a state dict of dinov2_vitl14 (`--dinov2-weights
PATH`), or the torch hub cache that `torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')` fills on a
machine with internet access (its code and checkpoints/dinov2_vitl14_pretrain.pth).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from tqdm import tqdm

from eval.fid import FIDError, frechet_distance, statistics_from_features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESOLUTION = 224
HUB_CODE = "facebookresearch_dinov2_main"  # the folder torch.hub keeps the repository's code in
HUB_CHECKPOINT = "dinov2_vitl14_pretrain.pth"
FETCH = "python -c \"import torch; torch.hub.load('facebookresearch/dinov2', 'dinov2_vitl14')\""


def _hub_model(pretrained: bool):
    code = os.path.join(torch.hub.get_dir(), HUB_CODE)
    if not os.path.isdir(code):
        raise FIDError(f"FD-DINOv2 needs DINOv2 ViT-L/14: its code is not in the torch hub cache ({code}); pass "
                       f"--dinov2-weights PATH (a TorchScript file), or fill the cache on a machine online: {FETCH}")
    return torch.hub.load(code, "dinov2_vitl14", source="local", pretrained=pretrained, verbose=False)


def load_dinov2(path: str | None = None, device="cpu") -> torch.nn.Module:
    """DINOv2 ViT-L/14 in eval mode: from `path` (TorchScript, or a state dict with the hub's code cached), or
    from the torch hub cache. FIDError (one line) when there are no weights; nothing is downloaded."""
    if path is not None:
        if not os.path.isfile(path):
            raise FIDError(f"--dinov2-weights {path}: file not found")
        try:
            model = torch.jit.load(path, map_location="cpu")
        except RuntimeError:  # not TorchScript: a state dict for the hub's model
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = _hub_model(pretrained=False)
            model.load_state_dict(state)
    else:
        checkpoint = os.path.join(torch.hub.get_dir(), "checkpoints", HUB_CHECKPOINT)
        if not os.path.isfile(checkpoint):
            raise FIDError(f"FD-DINOv2 needs the DINOv2 ViT-L/14 weights: none in the torch hub cache "
                           f"({checkpoint}); pass --dinov2-weights PATH, or fill the cache on a machine online: "
                           f"{FETCH}")
        model = _hub_model(pretrained=True)  # (reads the cached checkpoint)
    for parameter in model.parameters():  # (a ScriptModule has no requires_grad_)
        parameter.requires_grad_(False)
    return model.eval().to(device)


def preprocess(images: np.ndarray, device="cpu") -> torch.Tensor:
    """uint8 N×H×W×3 -> the network's input, float32 N×3×224×224, as EDM2's detector prepares it."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    x = torch.nn.functional.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bicubic", antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x / 255 - mean) / std


@torch.no_grad()
def dinov2_features(images: np.ndarray, model, batch_size: int = 64, device="cpu", progress: bool = True) -> np.ndarray:
    """The features (float64 N×D) of uint8 N×H×W×3 `images`."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="DINOv2", unit="batch", disable=not progress):
        out.append(model(preprocess(images[start:start + batch_size], device)).double().cpu().numpy())
    return np.concatenate(out)


def fd_dinov2(features_a: np.ndarray, features_b: np.ndarray, method: str | None = None) -> float:
    """The Fréchet distance between two sets of DINOv2 features (FID's formula and square root)."""
    return frechet_distance(*statistics_from_features(features_a), *statistics_from_features(features_b),
                            method=method or "sqrtm")
