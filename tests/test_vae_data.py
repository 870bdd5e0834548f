"""Images through a VAE on the fly, Hugging Face datasets, and flips.

A tiny randomly initialised AutoencoderKL (8 and 16 channels, 4 latent channels, 16x16 images -> 4x8x8
latents) and a tiny image dataset written with `datasets`' save_to_disk (8 images of varied sizes, 2
classes) stand in for the SD VAE and ImageNet: nothing is downloaded.
"""
import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch

import data as D
import prepare_latents
import training
from config import TrainConfig
from helpers import save_tiny_hf_dataset, save_tiny_vae

SIZE = 16  # pixels; the tiny VAE halves once: 4 x 8 x 8 latents
# The on-the-fly route encodes a training batch (4 images) where prepare_latents.py encoded all 8 at once;
# float32 convolutions of different batch sizes agree to a few ulps (measured: at most 7e-7 on these
# normalised latents, entries up to 3.5), and the same formula z = mu + eps * sigma follows. 1e-5 is 14
# times that and 10^4 times below a real difference (another crop, draw or flip moves entries by ~1).
TOL = 1e-5


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("vae_data")
    vae = save_tiny_vae(base / "vae")
    hf = save_tiny_hf_dataset(base / "hf")
    latents = base / "latents"
    assert prepare_latents.main(["--data-path", hf, "--out", str(latents), "--image-size", str(SIZE), "--vae", vae,
                                 "--device", "cpu", "--random-flip"]) == 0
    return {"base": base, "vae": vae, "hf": hf, "latents": str(latents)}


def step_batch(dataset, step, seed=3, batch=4):
    """The (x, y) that training step `step` sees: the step-indexed loader, then the dataset's model batch."""
    cfg = TrainConfig(batch_size=batch, seed=seed, num_workers=0)
    loader = training.make_loader(dataset, cfg, 0, 1, step, torch.device("cpu"))
    return dataset.model_batch(next(iter(loader)), "cpu")


@pytest.mark.parametrize("flip", [False, True], ids=["unflipped", "random-flip"])
def test_a_step_sees_on_the_fly_the_latents_that_prepare_latents_stored(files, flip):
    prepared = D.load_dataset(files["latents"], random_flip=flip)
    on_the_fly = D.load_dataset(files["hf"], image_size=SIZE, vae=files["vae"], random_flip=flip)
    assert (on_the_fly.kind, on_the_fly.channels, on_the_fly.resolution) == ("latent", 4, SIZE // 2)
    # The same normalisation: the subset is the whole set here, so the estimate is the prepared stats.pt.
    np.testing.assert_allclose(on_the_fly.stats["mean"], prepared.stats["mean"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(on_the_fly.stats["std"], prepared.stats["std"], rtol=1e-6)
    unflipped = D.load_dataset(files["latents"])
    mirrored = []
    for step in (0, 1, 7):
        x, y = step_batch(on_the_fly, step)
        x_prepared, y_prepared = step_batch(prepared, step)
        assert torch.equal(y, y_prepared)
        torch.testing.assert_close(x, x_prepared, rtol=0, atol=TOL)
        x_unflipped, _ = step_batch(unflipped, step)
        mirrored += [not torch.allclose(a, b, atol=TOL) for a, b in zip(x, x_unflipped)]
    # Without flips every item is the unflipped one; with them some are mirrored and some not (12 coins).
    assert (any(mirrored) and not all(mirrored)) if flip else not any(mirrored)


def test_a_mirrored_pixel_item_is_the_mirror_of_the_unmirrored_one(files):
    plain = D.load_dataset(files["hf"], image_size=SIZE)
    flipping = D.load_dataset(files["hf"], image_size=SIZE, random_flip=True)
    assert flipping.stats == plain.stats
    coins = []
    for seed in range(8):
        torch.manual_seed(seed)
        x, y = flipping[seed % len(plain)]
        torch.manual_seed(seed)
        coins.append(bool(torch.rand(()) < 0.5))  # the coin the item drew
        expected, y_expected = plain[seed % len(plain)]
        assert torch.equal(x, expected.flip(-1) if coins[-1] else expected) and int(y) == int(y_expected)
    assert any(coins) and not all(coins)


def test_a_mirrored_latent_item_is_the_encoding_of_the_mirrored_image(files):
    on_the_fly = D.load_dataset(files["hf"], image_size=SIZE, vae=files["vae"], random_flip=True)
    prepared = D.load_dataset(files["latents"], random_flip=True)
    vae = D.load_vae(files["vae"])
    mean = torch.tensor(on_the_fly.stats["mean"]).view(-1, 1, 1)
    std = torch.tensor(on_the_fly.stats["std"]).view(-1, 1, 1)
    coins = []
    for seed in range(8):
        idx = seed % len(on_the_fly)
        torch.manual_seed(seed)
        x, _ = on_the_fly[idx]
        torch.manual_seed(seed)
        x_prepared, _ = prepared[idx]
        # By hand: eps, then the coin; the crop mirrored when it falls; its posterior; the same normalisation.
        torch.manual_seed(seed)
        eps = torch.randn(on_the_fly.latent_shape)
        coins.append(bool(torch.rand(()) < 0.5))
        image = on_the_fly.source.pixels(idx, SIZE)
        mu, sd = D.encode_posterior(vae, (image.flip(-1) if coins[-1] else image)[None])
        expected = (mu[0] + eps * sd[0] - mean) / std
        torch.testing.assert_close(x, expected, rtol=0, atol=TOL)
        torch.testing.assert_close(x_prepared, expected, rtol=0, atol=TOL)
    assert any(coins) and not all(coins)
    # The encoder is not mirror-equivariant: the mirrored posterior is no mirrored latent.
    assert not torch.allclose(prepared.means_flip[0], prepared.means[0].flip(-1), atol=1e-3)


def test_old_latent_folders_load_and_refuse_random_flip_with_the_fix(files, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(files["latents"], old)
    for fn in D.LATENT_FLIP_FILES:
        os.remove(old / fn)
    assert len(D.load_dataset(str(old))) == 8
    with pytest.raises(D.DatasetError, match=r"prepare_latents.py --random-flip.*or drop --random-flip"):
        D.load_dataset(str(old), random_flip=True)


def test_prepare_latents_reads_a_hugging_face_dataset_and_stores_both_posteriors(files):
    folder = files["latents"]
    assert sorted(os.listdir(folder)) == ["labels.pt", "meta.json", "posterior_means.pt", "posterior_means_flip.pt",
                                          "posterior_stds.pt", "posterior_stds_flip.pt", "stats.pt"]
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["class_names"] == ["cat", "dog"] and meta["flipped_posteriors"] and meta["vae"] == files["vae"]
    labels = torch.load(os.path.join(folder, "labels.pt"), weights_only=True)
    assert labels.tolist() == [i % 2 for i in range(8)]
    ds = D.load_dataset(files["latents"], random_flip=True)
    vae = D.load_vae(files["vae"])
    source = D.open_image_source(files["hf"])
    for idx in (0, 5):
        image = source.pixels(idx, SIZE)
        torch.testing.assert_close(ds.means[idx], D.encode_posterior(vae, image[None])[0][0], rtol=0, atol=TOL)
        flipped = D.encode_posterior(vae, image.flip(-1)[None])[0][0]
        torch.testing.assert_close(ds.means_flip[idx], flipped, rtol=0, atol=TOL)


@pytest.mark.parametrize("split, column, message", [
    ("validation", "image", "no split 'validation'; pass --split with one of: train, test"),
    ("train", "picture", "no column 'picture' (columns: image, label, caption); pass --image-column NAME"),
    ("train", "caption", "holds Value('string'), not images; pass --image-column with an image column (image)"),
])
def test_a_wrong_split_or_image_column_is_one_error_naming_what_exists(tmp_path, split, column, message):
    hf = save_tiny_hf_dataset(tmp_path / "hf", n=2, splits=("train", "test"))
    with pytest.raises(D.DatasetError, match=re.escape(message)):
        D.load_dataset(hf, image_size=SIZE, split=split, image_column=column)


def test_hugging_face_images_train_in_pixel_space_with_class_names(files):
    ds = D.load_dataset(files["hf"], image_size=SIZE)
    assert (ds.kind, ds.name, len(ds), ds.channels, ds.resolution, ds.num_classes) == \
        ("pixel", f"hf:{files['hf']}", 8, 3, SIZE, 2)
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [i % 2 for i in range(8)]
    x, y = ds[3]
    assert x.shape == (3, SIZE, SIZE) and int(y) == 1
    # An item is the ADM centre crop of the stored image, normalised.
    import datasets
    image = datasets.load_from_disk(files["hf"])[3]["image"]
    pixels = D.image_tensor(image, SIZE)
    torch.testing.assert_close(x, D.normalize(pixels, ds.stats))


def test_a_resumed_vae_run_reuses_its_recorded_latent_statistics(files):
    recorded = {"stats": {"mean": [0.5] * 4, "std": [2.0] * 4}, "stats_num_images": 1000}
    ds = D.load_dataset(files["hf"], image_size=SIZE, vae=files["vae"], recorded=recorded)
    assert ds.stats == recorded["stats"] and ds.describe()["stats_num_images"] == 1000
    fresh = D.load_dataset(files["hf"], image_size=SIZE, vae=files["vae"])
    assert fresh.describe()["stats_num_images"] == 8 and fresh.stats != recorded["stats"]


# ----------------------------------------------------------------------------------------------------
# Through the command lines


class _StubNet(torch.nn.Module):
    """A stand-in for the FID Inception (TorchScript, 24 features): the CLIs run in seconds."""

    def forward(self, x):
        p = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return torch.cat([p, p * p], dim=1)


FAST = ["--model", "DiT-XS/4", "--batch-size", "4", "--num-workers", "0", "--lr", "1e-3", "--log-every", "1",
        "--magnitude-every", "1000", "--image-size", str(SIZE)]


def _only_run(results):
    [name] = os.listdir(results)
    return os.path.join(results, name)


def test_a_vae_run_trains_samples_and_scores_fid_through_the_command_lines(files, tmp_path, capsys):
    import sample
    import train
    from eval import ref_stats, sample_fid
    stub = tmp_path / "stub.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_StubNet()).save(str(stub))
    ref = tmp_path / "ref.npz"
    assert ref_stats.main(["--data-path", files["hf"], "--image-size", str(SIZE), "--out", str(ref),
                           "--inception-weights", str(stub), "--device", "cpu"]) == 0
    results = tmp_path / "results"
    fid = ["--eval-every", "2", "--eval-samples", "4", "--eval-sampling-steps", "2", "--eval-batch-size", "4",
           "--eval-ref", str(ref), "--inception-weights", str(stub), "--eval-max-fraction", "1"]
    assert train.main([*FAST, "--data-path", files["hf"], "--vae", files["vae"], "--random-flip", "--num-steps", "2",
                       "--ckpt-every", "2", "--ema-snapshot-every", "1", "--results-dir", str(results), *fid]) == 0
    run = _only_run(results)
    config = json.load(open(os.path.join(run, "config.json")))
    assert config["data"]["kind"] == "latent" and config["data"]["vae"] == files["vae"]
    assert config["data"]["encoding"] == "on the fly" and len(config["data"]["stats"]["std"]) == 4
    assert (config["in_channels"], config["input_size"]) == (4, SIZE // 2)
    in_training = [json.loads(line) for line in open(os.path.join(run, "fid_during_training.jsonl"))]
    assert in_training and np.isfinite(in_training[-1]["fid"])

    png = tmp_path / "grid.png"
    assert sample.main(["--result-dir", run, "--num-samples", "2", "--num-sampling-steps", "2", "--device", "cpu",
                        "--output", str(png)]) == 0
    from PIL import Image
    with Image.open(png) as grid:
        assert grid.size[0] > SIZE and grid.mode == "RGB"  # two rows of decoded 16x16 images, enlarged
    capsys.readouterr()
    assert sample_fid.main(["--result-dir", run, "--num-samples", "4", "--num-sampling-steps", "2",
                            "--batch-size", "4", "--ref", str(ref), "--inception-weights", str(stub)]) == 0
    assert "FID" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["latent folder", "vae"])
def test_a_resumed_run_with_random_flip_equals_the_uninterrupted_one(files, tmp_path, kind):
    """(Pixel flips take the same path as the VAE's images, without the encoder.)"""
    import train
    from test_train import assert_emas_close, assert_states_close, load_ckpt
    source = {"latent folder": [files["latents"]], "vae": [files["hf"], "--vae", files["vae"]]}[kind]
    results = tmp_path / "a"
    assert train.main([*FAST, "--data-path", *source, "--random-flip", "--num-steps", "2", "--ckpt-every", "1",
                       "--ema-snapshot-every", "1000", "--results-dir", str(results)]) == 0
    run = _only_run(results)
    resumed = shutil.copytree(run, tmp_path / "b" / os.path.basename(run))
    os.remove(os.path.join(resumed, "checkpoints", "0000002.pt"))
    assert train.main(["--resume", str(resumed)]) == 0  # step 2 again (4 items, 4 coins), from step 1's checkpoint
    a, b = load_ckpt(run), load_ckpt(resumed)
    assert a["step"] == b["step"] == 2
    assert_states_close(b["model"], a["model"])
    assert_emas_close(b["ema"], a["ema"])


def test_a_run_folder_moves_and_its_tools_take_the_vae_where_it_is_now(files, tmp_path, capsys):
    """A VAE folder inside the results folder is recorded relative to the run too, so the moved results
    folder samples as it is; a VAE moved elsewhere is named with --vae (sample.py, resume)."""
    import sample
    import train
    results = tmp_path / "results"
    vae = shutil.copytree(files["vae"], results / "vae")
    assert train.main([*FAST, "--data-path", files["hf"], "--vae", str(vae), "--num-steps", "1",
                       "--ckpt-every", "1", "--ema-snapshot-every", "1", "--results-dir", str(results)]) == 0
    config = json.load(open(results / "000-DiT-XS-4" / "config.json"))
    assert config["data"]["vae"] == str(vae) and config["data"]["vae_from_run"] == os.path.join(os.pardir, "vae")
    moved = tmp_path / "elsewhere"
    shutil.move(str(results), str(moved))
    run = str(moved / "000-DiT-XS-4")
    grid = ["--run-dir", run, "--num-samples", "1", "--num-sampling-steps", "1", "--device", "cpu", "--no-progress"]
    assert sample.main(grid) == 0
    far = shutil.move(str(moved / "vae"), str(tmp_path / "far-vae"))
    assert sample.main(grid) == 2
    assert "VAE folder not found" in capsys.readouterr().err
    assert sample.main([*grid, "--vae", far]) == 0
    assert train.main(["--resume", run, "--num-steps", "2"]) == 2  # the recorded VAE is gone...
    assert train.main(["--resume", run, "--num-steps", "2", "--vae", far]) == 0  # ...and --vae says where


def test_loading_a_vae_prints_no_notice_about_accelerate(files):
    """diffusers' default load wants `accelerate` (not a dependency) and says so in five lines at every load."""
    import logging
    from diffusers import AutoencoderKL
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")  # (diffusers' loggers stop propagating here)
    logger.addHandler(handler)
    verbosity = logger.level
    logger.setLevel(logging.WARNING)  # (whatever an earlier test left: the notice is a warning)
    try:
        D.load_vae(files["vae"])
        quiet = list(records)
        AutoencoderKL.from_pretrained(files["vae"])  # the default load, for comparison
    finally:
        logger.removeHandler(handler)
        logger.setLevel(verbosity)
    assert not [r for r in quiet if "accelerate" in r.getMessage()]
    import importlib.util
    if importlib.util.find_spec("accelerate") is None:  # (where it is missing the default load does say it)
        assert [r for r in records if "accelerate" in r.getMessage()]
