"""Small shared builders for the tests (tiny models that run a step in milliseconds)."""
import itertools

import torch

from models import DiT
from mp_layers import MPConfig


def tiny_dit(mp=MPConfig(), *, depth=2, width=32, heads=2, patch=2, in_channels=2, input_size=4, num_classes=5):
    return DiT(depth=depth, width=width, num_heads=heads, patch_size=patch, in_channels=in_channels,
               input_size=input_size, num_classes=num_classes, mp=mp)


def all_switch_combinations():
    names = MPConfig.switch_names()
    for bits in itertools.product([False, True], repeat=len(names)):
        yield MPConfig(**dict(zip(names, bits)))


def rms(x):
    return x.float().square().mean().sqrt().item()
