"""The Python API (mapdit.py): README's three-line example runs as written on a tiny trained run, and its
images are those sample.py draws with the same options."""
import os
import re

import numpy as np
import pytest

import mapdit
import train
from helpers import only_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    results = tmp_path_factory.mktemp("api") / "results"
    assert train.main(["--model", "DiT-XS/8", "--batch-size", "8", "--num-steps", "2", "--ema-snapshot-every", "1",
                       "--ckpt-every", "2", "--magnitude-every", "1000", "--results-dir", str(results)]) == 0
    return only_run(results)


def readme_example() -> str:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs_and_returns_the_images_it_says(run_dir):
    code = readme_example()
    assert len(code.strip().splitlines()) == 3 and '"results/000-DiT-XS-2"' in code
    scope = {}
    exec(code.replace('"results/000-DiT-XS-2"', repr(run_dir)), scope)
    images = scope["images"]
    assert images.dtype == np.uint8 and images.shape == (8, 16, 16, 3)
    assert scope["run"].model.training is False and scope["run"].config["model"] == "DiT-XS/8"


def test_the_api_draws_what_sample_py_draws(run_dir, tmp_path):
    import sample
    from PIL import Image
    run = mapdit.load_run(run_dir, device="cpu")
    images = run.sample(class_labels=[1, 2], n=2, sampler="ddim", steps=3, cfg_scale=2.0, seed=5)
    out = tmp_path / "grid.png"
    assert sample.main(["--run-dir", run_dir, "--class-label", "1", "2", "--num-samples", "2", "--sampler", "ddim",
                        "--num-sampling-steps", "3", "--cfg-scale", "2", "--seed", "5", "--device", "cpu",
                        "--output", str(out), "--no-progress"]) == 0
    expected = sample.image_grid(images, rows=2)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))


def test_another_ema_length_and_every_class_by_default(run_dir):
    run = mapdit.load_run(run_dir, device="cpu")
    short = run.sample(n=1, steps=2, sampler="ddim", ema_std=0.10)
    assert len(short) == run.num_classes and run.ema_std == 0.10
    with pytest.raises(ValueError, match="class label 10 is out of range"):
        run.sample(class_labels=10)
