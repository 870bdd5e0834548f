"""Small shared builders for the tests (tiny models that run a step in milliseconds)."""
import contextlib
import itertools
import os

import torch

from models import DiT
from mp_layers import MPConfig


def tiny_dit(mp=MPConfig(), *, depth=2, width=32, heads=2, patch=2, in_channels=2, input_size=4, num_classes=5):
    return DiT(depth=depth, width=width, num_heads=heads, patch_size=patch, in_channels=in_channels,
               input_size=input_size, num_classes=num_classes, mp=mp)


def interaction_configs() -> dict[str, MPConfig]:
    """The switch sets that cover the interactions without the full 2ⁿ product: none, every switch on,
    every switch alone, every switch left out of all-on, and every pair. Generated from MPConfig's fields."""
    names = MPConfig.switch_names()
    every = {n: True for n in names}
    short = {n: n.removeprefix("use_") for n in names}
    configs = {"none": MPConfig(), "every": MPConfig(**every)}
    configs.update({short[n]: MPConfig(**{n: True}) for n in names})
    configs.update({"no_" + short[n]: MPConfig(**{**every, n: False}) for n in names})
    configs.update({f"{short[a]}+{short[b]}": MPConfig(**{a: True, b: True})
                    for a, b in itertools.combinations(names, 2)})
    return configs


@contextlib.contextmanager
def one_thread():
    """Tiny models run several times faster on one thread (no thread start-up per kernel)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def rms(x):
    return x.float().square().mean().sqrt().item()


def save_tiny_vae(path, blocks=(8, 16)):
    """A randomly initialised diffusers AutoencoderKL (3 -> 4 channels, downsampling 2^(len(blocks)-1)),
    saved with save_pretrained to `path`; returns the path as a string."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks,
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(str(path))
    return str(path)


def save_tiny_hf_dataset(path, n=8, classes=("cat", "dog"), splits=None, seed=0):
    """A Hugging Face image dataset written with save_to_disk (never downloaded): `n` RGB images of varied,
    non-square sizes (the centre crop matters), a ClassLabel "label" and a text column "caption".
    With `splits` (names), a DatasetDict of that many copies."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (20 + 3 * (i % 3), 18 + 5 * (i % 2), 3), dtype=np.uint8))
              for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(classes)),
                                  "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % len(classes) for i in range(n)],
                                     "caption": [f"picture {i}" for i in range(n)]}, features=features)
    if splits:
        ds = datasets.DatasetDict({s: ds for s in splits})
    ds.save_to_disk(str(path))
    return str(path)


def only_run(results_dir):
    """The one run folder train.py made under results_dir (fails if there are more)."""
    runs = sorted(os.listdir(results_dir))
    assert len(runs) == 1, runs
    return os.path.join(results_dir, runs[0])
