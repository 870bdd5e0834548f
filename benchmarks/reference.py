"""Stored reference figures that bench.py's GPU rows are compared with.

Both were measured on one NVIDIA H200 with PyTorch 2.11, global batch 256, random latents, 20 timed steps
after 5 warm-up steps, by the same protocol as bench.py: the paper's code (ericbill21/map-dit, the version
with the eight flags; TF32 eager, its own setting, since it fails under bf16 autocast) and vanilla DiT
(facebookresearch/DiT).
"""
from __future__ import annotations

# The paper's code. (model, latent size, switches) -> (train img/s, fwd img/s, peak GiB)
MAPDIT = {
    ("DiT-XS/2", 16, "none"): (13_367, 88_772, 2.2),
    ("DiT-XS/2", 16, "all"): (5_849, 27_572, 2.5),
    ("DiT-S/4", 16, "none"): (7_556, 46_777, 2.3),
    ("DiT-S/4", 16, "all"): (4_298, 23_726, 2.8),
    ("DiT-S/2", 16, "none"): (7_441, 34_408, 6.6),
    ("DiT-S/2", 16, "all"): (3_397, 21_007, 7.5),
    ("DiT-B/2", 32, "none"): (920, 3_230, 48.9),
    ("DiT-B/2", 32, "all"): (720, 2_721, 54.5),
}
# Vanilla DiT. (model, latent size, precision, compiled) -> (train img/s, fwd img/s, peak GiB)
VANILLA = {
    ("DiT-S/4", 16, "tf32", False): (7_473, 36_821, 2.2),
    ("DiT-S/2", 16, "tf32", False): (6_836, 27_837, 6.5),
    ("DiT-B/2", 32, "tf32", False): (818, 2_787, 48.4),
    ("DiT-B/2", 32, "bf16", False): (1_529, 4_342, 30.6),
    ("DiT-B/2", 32, "bf16", True): (2_495, 9_456, 25.7),
}
NOTE = ("reference: the paper's code measured on an H200 (benchmarks/reference.py), PyTorch 2.11, batch 256 "
        "(map-dit: TF32 eager)")


def add_reference(row: dict) -> None:
    """Adds the matching reference figures to a measured row, and our throughput as a multiple of them."""
    if row.get("channels") != 4 or "train_img_s" not in row:
        return
    ref = MAPDIT.get((row["model"], row["size"], row["switches"]))
    if ref:
        row["ref_mapdit"] = {"train_img_s": ref[0], "fwd_img_s": ref[1], "peak_gib": ref[2]}
        row["x_ref_train"] = row["train_img_s"] / ref[0]
        row["x_ref_fwd"] = row["fwd_img_s"] / ref[1]
    ref = VANILLA.get((row["model"], row["size"], row["precision"], row["compile"]))
    if ref:
        row["ref_vanilla"] = {"train_img_s": ref[0], "fwd_img_s": ref[1], "peak_gib": ref[2]}
        row["x_vanilla_train"] = row["train_img_s"] / ref[0]
        row["x_vanilla_fwd"] = row["fwd_img_s"] / ref[1]


def mapdit_ratios(model: str, size: int, switches: str, channels: int) -> tuple[float, float] | None:
    """The paper's code's step-time ratio of `switches` to none (train, fwd), where it was measured."""
    none, other = MAPDIT.get((model, size, "none")), MAPDIT.get((model, size, switches))
    if channels != 4 or not none or not other:
        return None
    return none[0] / other[0], none[1] / other[1]
