"""Small shared builders for the tests (tiny models that run a step in milliseconds)."""
import contextlib
import itertools

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
