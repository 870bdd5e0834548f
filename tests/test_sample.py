"""Tests for sampling from a trained run: post-hoc EMA on real snapshots, sample.py (PNG grid, determinism,
--ckpt, bad input), eval/sample_fid.py (npz format, label draw, defaults of the FID-10K protocol, FID against a
statistics file) and runs.load_run_model's errors.

One tiny run (DiT-XS/2, all MP switches, 8 steps at batch 8 on the built-in 1x16x16 digits, EMA snapshots every
2 steps, checkpoints at 4 and 8) is trained in-process once for the whole module. Sampling uses a few DDIM steps;
only the FID pipeline test swaps the sampler and the Inception network for cheap stand-ins (the real network's
2048-d covariance square root alone takes longer than this whole file on a small CPU).
"""
import contextlib
import json
import math
import shutil
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ema
import eval.evaluate as evaluate_mod
import eval.sample_fid as sample_fid
import phema
import runs
import sample
import train
from eval.fid import fid_from_images, save_statistics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
NUM_STEPS, CKPT_EVERY, SNAP_EVERY = 8, 4, 2  # ~1.5-3 s per step on a loaded 2-core CPU
SIZE, NUM_CLASSES = 16, 10  # digits: 1x16x16, 10 classes


def grid_size(rows, cols, h=SIZE, min_tile=64, pad=2):
    """(width, height) of sample.image_grid's canvas: tiles enlarged by ceil(min_tile / h), `pad` pixels around."""
    tile = h * math.ceil(min_tile / h)
    return cols * (tile + pad) + pad, rows * (tile + pad) + pad


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    rc = train.main(["--data-path", "digits", "--model", "DiT-XS/2", "--use-all-mp", "--lr", "1e-2",
                     "--num-steps", str(NUM_STEPS), "--batch-size", "8", "--num-workers", "0", "--log-every", "4",
                     "--ckpt-every", str(CKPT_EVERY), "--ema-snapshot-every", str(SNAP_EVERY),
                     "--magnitude-every", str(NUM_STEPS), "--results-dir", str(results)])
    assert rc == 0
    (name,) = os.listdir(results)
    run = os.path.join(results, name)
    assert [s for s, _ in runs.list_checkpoints(run)] == [CKPT_EVERY, NUM_STEPS]
    assert len(phema.list_snapshots(os.path.join(run, "ema"))) == 2 * NUM_STEPS // SNAP_EVERY
    return run


def tracked_emas(run, step):
    ckpt = torch.load(os.path.join(run, "checkpoints", f"{step:07d}.pt"), map_location="cpu", weights_only=True)
    return ckpt["ema"], ckpt["model"]


# ----------------------------------------------------------------------------------------------------
# 1. post-hoc EMA on a real run


@pytest.mark.parametrize("step", [NUM_STEPS, CKPT_EVERY])
def test_posthoc_reproduces_tracked_ema(run_dir, step):
    """The post-hoc EMA for a tracked σ_rel at a snapshot step is that EMA, up to the snapshots' fp16 rounding."""
    state, info = phema.reconstruct_ema(os.path.join(run_dir, "ema"), 0.05,
                                        step=None if step == NUM_STEPS else step)
    assert info["step"] == step
    assert {s[2] for s in info["sources"]} == set(range(SNAP_EVERY, step + 1, SNAP_EVERY))
    ref = tracked_emas(run_dir, step)[0][0.05]
    assert state.keys() == ref.keys()
    worst = 0.0
    for name, want in ref.items():
        want = want.float()
        got = state[name]
        assert got.dtype == torch.float32 and got.shape == want.shape
        err = (got - want).abs()
        # round-to-nearest fp16: |fl(x) - x| <= 2^-11 |x| for normal x, <= 2^-25 in the subnormal range
        bound = 2.0**-11 * want.abs() + 2.0**-24
        assert bool((err <= bound * 1.01).all()), f"{name}: worst error / fp16 bound {float((err / bound).max()):.3f}"
        worst = max(worst, float(err.norm() / want.norm().clamp_min(1e-12)))
    assert worst < 1e-3  # per tensor, relative (fp16 rounding gives ~3e-4)


def test_posthoc_from_other_profile_moves_towards_target(run_dir, tmp_path):
    """σ_rel 0.05 rebuilt from the 0.10 snapshots alone is closer to the tracked 0.05 EMA than the 0.10 EMA is."""
    only10 = tmp_path / "only10"
    only10.mkdir()
    for path, std, _ in phema.list_snapshots(os.path.join(run_dir, "ema")):
        if math.isclose(std, 0.10):
            os.symlink(path, only10 / os.path.basename(path))
    state, info = phema.reconstruct_ema(only10, 0.05)
    assert len(info["sources"]) == NUM_STEPS // SNAP_EVERY
    tracked = tracked_emas(run_dir, NUM_STEPS)[0]

    def dist(a, b):
        return math.sqrt(sum(float((a[k].float() - b[k].float()).square().sum()) for k in b))

    assert dist(state, tracked[0.05]) < dist(tracked[0.10], tracked[0.05])


def test_ema_cli_writes_posthoc_files(run_dir, tmp_path):
    out = tmp_path / "posthoc"
    r = subprocess.run([sys.executable, "ema.py", "--result-dir", run_dir, "--ema-std", "0.05", "0.08",
                        "--out", str(out)], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == [f"posthoc-0.050-{NUM_STEPS:07d}.pt", f"posthoc-0.080-{NUM_STEPS:07d}.pt"]
    saved = torch.load(out / f"posthoc-0.080-{NUM_STEPS:07d}.pt", weights_only=True)
    assert saved["std"] == pytest.approx(0.08) and saved["step"] == NUM_STEPS
    want, _ = phema.reconstruct_ema(os.path.join(run_dir, "ema"), 0.08)
    for k, v in want.items():
        assert torch.equal(saved["state"][k], v), k
    assert f"wrote {out / f'posthoc-0.080-{NUM_STEPS:07d}.pt'} (sigma_rel 0.080, " in r.stdout


# ----------------------------------------------------------------------------------------------------
# 2. sample.py on the run


def test_sample_grid_rows_are_classes_and_deterministic(run_dir, tmp_path, capsys):
    classes, per_class = ["7", "2"], 3
    common = ["--result-dir", run_dir, "--class-label", *classes, "--num-samples", str(per_class),
              "--num-sampling-steps", "5", "--sampler", "ddim", "--seed", "5"]
    a, b = tmp_path / "a.png", tmp_path / "sub" / "b.png"
    assert sample.main([*common, "--output", str(a)]) == 0
    out = capsys.readouterr().out
    assert "post-hoc EMA σ_rel=0.05" in out and "2 rows" in out
    assert sample.main([*common, "--output", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()  # same seed -> the same file

    img = np.asarray(Image.open(a))
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    w, h = grid_size(rows=len(classes), cols=per_class)
    assert Image.open(a).size == (w, h) == (200, 134)
    # white padding between tiles, grayscale tiles (digits have one channel) that are not blank
    tile = 64
    assert (img[:2] == 255).all() and (img[:, :2] == 255).all() and (img[2 + tile: 4 + tile] == 255).all()
    tiles = [img[2 + r * (tile + 2): 2 + r * (tile + 2) + tile, 2 + c * (tile + 2): 2 + c * (tile + 2) + tile]
             for r in range(len(classes)) for c in range(per_class)]
    for t in tiles:
        assert (t[..., 0] == t[..., 1]).all() and (t[..., 0] == t[..., 2]).all()
        assert (t == t[::4, ::4].repeat(4, 0).repeat(4, 1)).all()  # nearest 4x enlargement of a 16x16 sample
    assert np.std(np.stack(tiles)) > 0
    assert not all((t == tiles[0]).all() for t in tiles[1:])  # different noise per image


def test_sample_from_checkpoint_default_output(run_dir, capsys):
    assert sample.main(["--result-dir", run_dir, "--ckpt", str(CKPT_EVERY), "--class-label", "1", "--num-samples", "2",
                        "--num-sampling-steps", "2", "--sampler", "ddim", "--cfg-scale", "1"]) == 0
    assert f"raw weights of checkpoint {CKPT_EVERY}" in capsys.readouterr().out
    path = os.path.join(run_dir, "samples", f"ckpt{CKPT_EVERY:07d}-cfg1-ddim2.png")
    assert Image.open(path).size == grid_size(rows=1, cols=2)


def test_ckpt_as_a_path_or_a_step_gives_the_same_images(run_dir, tmp_path):
    common = ["--result-dir", run_dir, "--class-label", "1", "2", "--num-samples", "2", "--num-sampling-steps", "2",
              "--sampler", "ddpm", "--cfg-scale", "1.5"]
    path = os.path.join(run_dir, "checkpoints", f"{CKPT_EVERY:07d}.pt")
    assert sample.main([*common, "--ckpt", str(CKPT_EVERY), "--output", str(tmp_path / "step.png")]) == 0
    assert sample.main([*common, "--ckpt", path, "--output", str(tmp_path / "path.png")]) == 0
    by_step, by_path = (np.asarray(Image.open(tmp_path / f"{w}.png")) for w in ("step", "path"))
    assert by_step.std() > 0
    np.testing.assert_array_equal(by_path, by_step)
    assert sample.main([*common, "--ckpt", path]) == 0  # the default output is named by the step
    assert [f for f in os.listdir(os.path.join(run_dir, "samples")) if f.startswith(f"ckpt{CKPT_EVERY:07d}-cfg1.5")]


EXPORTS = {"post-hoc EMA as safetensors": ("model.safetensors", ["--ema-std", "0.07"], {"ema_std": 0.07}),
           "tracked EMA of a checkpoint as pt": ("model.pt", ["--ckpt", str(CKPT_EVERY), "--ckpt-ema", "--ema-std",
                                                             "0.05"], {"ckpt_step": CKPT_EVERY, "ckpt_ema": True}),
           "raw weights as pt": ("model.pt", ["--ckpt", str(NUM_STEPS)], {"ema_std": None, "ckpt_step": NUM_STEPS})}


def read_export(path):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("case", EXPORTS)
def test_exported_weights_load_strictly_into_a_plain_model_and_give_the_samples_of_sample_py(run_dir, tmp_path,
                                                                                              case):
    # With every MP switch on (weight-normalised, force-normalised, gains, MP-SiLU folded by the fast paths):
    # the plain model, built from the exported JSON alone, samples what sample.py's fast model samples.
    from fast_paths import apply_fast_paths
    from models import build_model
    from mp_layers import MPConfig
    name, flags, weights = EXPORTS[case]
    path = str(tmp_path / name)
    assert ema.main(["--result-dir", run_dir, *flags, "--export", path]) == 0
    described = json.load(open(tmp_path / "model.json"))
    plain = build_model(described["model"], in_channels=described["in_channels"],
                        input_size=described["input_size"], num_classes=described["num_classes"],
                        mp=MPConfig(**described["mp"]))
    state = read_export(path)
    assert sorted(state) == sorted(plain.state_dict())  # (safetensors sorts the names)
    plain.load_state_dict(state, strict=True)
    plain.eval()

    project, config, _ = runs.load_run_model(run_dir, **weights)  # the project's way, as sample.py does
    apply_fast_paths(project)
    assert described["mp"] == config["mp"] and all(v for k, v in config["mp"].items() if k.startswith("use_")
                                                  and k != "use_mp_fourier")
    labels = torch.tensor([0, 3, 7, 9])
    kw = dict(cfg_scale=1.5, num_steps=3, sampler="ddim", seed=5, batch_size=4, device="cpu", progress=False)
    ours, theirs = (sample.generate(m, config, labels, **kw).astype(int) for m in (project, plain))
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 0.01  # (float rounding of the fast path)
    x, t = torch.randn(4, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 300, 600, 999])
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, labels), project(x, t, labels), rtol=1e-5, atol=1e-5)
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            assert json.loads(f.metadata()["config"]) == described


def test_export_bad_input_is_one_line_before_any_work(run_dir, tmp_path, capsys):
    for flags, message in [(["--ema-std", "0.05", "--export", str(tmp_path / "m.bin")], "end it in .safetensors"),
                           (["--ema-std", "0.05", "0.1", "--export", str(tmp_path / "m.pt")], "one --ema-std"),
                           (["--export", str(tmp_path / "m.pt")], "needs --ema-std S"),
                           (["--ckpt", "4", "--ema-std", "0.05", "--export", str(tmp_path / "m.pt")], "--ckpt-ema"),
                           (["--ckpt", "3", "--export", str(tmp_path / "m.pt")], "no checkpoint at step 3")]:
        assert ema.main(["--result-dir", run_dir, *flags]) == 2
        assert message in one_error_line(capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_load_run_model_weights(run_dir):
    model, config, what = runs.load_run_model(run_dir, ema_std=None, ckpt_step=CKPT_EVERY)
    assert not model.training and config["num_classes"] == NUM_CLASSES
    raw = tracked_emas(run_dir, CKPT_EVERY)[1]
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k]), k
    model, _, what = runs.load_run_model(run_dir, ema_std=0.05, step=CKPT_EVERY)
    assert what == f"post-hoc EMA σ_rel=0.05 at step {CKPT_EVERY}"


def test_generate_noise_depends_on_global_position(run_dir):
    """A shard starting at a multiple of the batch size reproduces those images of a single process."""
    model, config, _ = runs.load_run_model(run_dir, ema_std=None, ckpt_step=NUM_STEPS)
    labels = torch.tensor([3, 1, 4, 1])
    kw = dict(cfg_scale=1.0, num_steps=1, sampler="ddpm", seed=42, batch_size=2, device="cpu", progress=False)
    full = sample.generate(model, config, labels, **kw)
    shard = sample.generate(model, config, labels[2:], first_index=2, **kw)
    assert full.shape == (4, SIZE, SIZE, 3) and full.dtype == np.uint8
    np.testing.assert_array_equal(shard, full[2:])
    assert not np.array_equal(full[:2], full[2:])


@pytest.mark.parametrize("how", ["bf16", "compile"])
def test_generate_in_bf16_and_compiled_follows_fp32(run_dir, how):
    """bf16 autocast and a compiled forward give the fp32 images up to rounding (DDIM: deterministic path);
    the model is left uncompiled afterwards."""
    if how == "compile" and os.environ.get("MAPDIT_COMPILE_TESTS", "1") == "0":
        pytest.skip("MAPDIT_COMPILE_TESTS=0")
    model, config, _ = runs.load_run_model(run_dir, ema_std=None, ckpt_step=NUM_STEPS)
    labels = torch.tensor([3, 1, 4, 1])
    kw = dict(cfg_scale=2.0, num_steps=4, sampler="ddim", seed=1, batch_size=4, device="cpu", progress=False)
    ref = sample.generate(model, config, labels, precision="fp32", **kw).astype(float)
    extra = {"precision": "bf16"} if how == "bf16" else {"compile": True}
    from torch._dynamo.utils import counters
    frames = counters["frames"]["ok"]
    out = sample.generate(model, config, labels, **extra, **kw).astype(float)
    assert out.shape == ref.shape
    diff = np.abs(out - ref)
    if how == "bf16":  # bf16 did change the arithmetic, and only by rounding (measured: mean 0.02, max 7 levels)
        assert 0 < diff.max() and diff.mean() < 0.5, (diff.mean(), diff.max())
    else:  # the compiled forward ran (dynamo compiled frames) and gave the same images
        assert counters["frames"]["ok"] > frames
        assert diff.mean() < 0.05, diff.mean()
    assert "forward" not in vars(model)


# ----------------------------------------------------------------------------------------------------
# 3. bad input: one "error:" line, exit code 2


def test_sample_missing_run_folder_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--result-dir", str(tmp_path / "nope"), "--class-label", "0"],
                       cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "run folder not found" in one_error_line(r.stderr) and "nope" in r.stderr


@pytest.mark.parametrize("extra, message", [
    (["--class-label", "0", str(NUM_CLASSES)], f"class label {NUM_CLASSES} is out of range: this run has 10 classes"),
    (["--class-label", "-1"], "class label -1 is out of range"),
    (["--ckpt", "7"], f"no checkpoint at step 7 in {{run}} (available: {CKPT_EVERY}, {NUM_STEPS})"),
    (["--step", "99"], "step 99 is after the last snapshot"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number, got nan"),
    (["--cfg-scale", "inf"], "--cfg-scale must be a finite number, got inf"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--seed", str(10**23)], "--seed must be an integer in 0..4294967295"),
    (["--seed", "-1"], "--seed must be an integer in 0..4294967295"),
    (["--device", "bogus"], "--device bogus: not a device; use cpu, cuda or cuda:N"),
    (["--ddim-eta", "0.5"], "--ddim-eta applies to --sampler ddim only"),
    (["--guidance-interval", "0", "nan"], "--guidance-interval: guidance interval must be 0 <= LO < HI"),
    (["--guide", "ckpt:7"], "no checkpoint at step 7"),
    (["--guide", "ema:-1"], "σ_rel must be a finite number > 0"),
    (["--guide", "ema:0.1", "--cfg-scale", "1"], "--guide has no effect at --cfg-scale 1"),
])
def test_sample_bad_input(run_dir, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(sample, "generate", never_called)
    out = tmp_path / "x.png"
    assert sample.main(["--result-dir", run_dir, "--output", str(out), *extra]) == 2
    captured = capsys.readouterr()
    assert message.format(run=run_dir) in one_error_line(captured.err)
    assert not out.exists()


def never_called(*a, **k):
    raise AssertionError("sampling must not start after a bad input")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_sample_device_cuda_without_a_gpu_is_one_line(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(sample, "generate", never_called)
    assert sample.main(["--result-dir", run_dir, "--device", "cuda"]) == 2
    assert "no usable CUDA GPU; use --device cpu" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("key, value, what", [("input_size", 32, "image size is 32, this run's is 16"),
                                              ("num_classes", 5, "class count is 5, this run's is 10")])
def test_guide_run_of_another_shape_is_refused_before_sampling(run_dir, tmp_path, capsys, monkeypatch, key,
                                                                value, what):
    monkeypatch.setattr(sample, "generate", never_called)
    other = tmp_path / "other-run"
    other.mkdir()
    config = json.loads(open(os.path.join(run_dir, "config.json")).read())
    (other / "config.json").write_text(json.dumps({**config, key: value}))
    assert sample.main(["--result-dir", run_dir, "--guide", str(other), "--cfg-scale", "2"]) == 2
    assert what in one_error_line(capsys.readouterr().err)


def test_a_guide_trained_on_other_data_is_taken_with_a_warning(run_dir, tmp_path, capsys, monkeypatch):
    guides = []

    def generate(model, config, labels, **kw):
        guides.append(kw["guide"])
        return np.zeros((len(labels), 16, 16, 3), np.uint8)
    monkeypatch.setattr(sample, "generate", generate)
    other = tmp_path / "mnist-run"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("samples", "fid"))
    config = json.loads((other / "config.json").read_text())
    config["data"]["name"] = "mnist"  # (the same 1x16x16 images and 10 classes as the digits)
    (other / "config.json").write_text(json.dumps(config))
    assert sample.main(["--run-dir", run_dir, "--guide", str(other), "--cfg-scale", "2", "--class-label", "1",
                        "--num-samples", "1", "--output", str(tmp_path / "g.png")]) == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"warning: --guide {other} was trained on mnist, this run on digits")
    assert len(guides) == 1 and isinstance(guides[0], torch.nn.Module)  # sampled with the guide, not without
    assert (tmp_path / "g.png").exists()


def test_one_sample_per_class_is_said_in_the_singular(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "generate", lambda model, config, labels, **kw: np.zeros((len(labels), 16, 16, 3),
                                                                                       np.uint8))
    assert sample.main(["--run-dir", run_dir, "--num-samples", "1", "--output", str(tmp_path / "g.png")]) == 0
    assert "1 sample each)" in capsys.readouterr().out


@pytest.mark.parametrize("form", ["ema:0.1", f"step:{CKPT_EVERY}", f"ckpt:{CKPT_EVERY}", "another-run"])
def test_each_guide_form_samples(run_dir, tmp_path, capsys, form):
    if form == "another-run":
        form = str(tmp_path / "copy")
        shutil.copytree(run_dir, form, ignore=shutil.ignore_patterns("samples", "fid"))
    out = tmp_path / "g.png"
    assert sample.main(["--result-dir", run_dir, "--guide", form, "--cfg-scale", "2", "--class-label", "3",
                        "--num-samples", "2", "--sampler", "dpm-solver++", "--num-sampling-steps", "3",
                        "--guidance-interval", "0.5", "50", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "guide " in printed and Image.open(out).size == grid_size(rows=1, cols=2)


def test_guide_equal_to_the_main_weights_samples_the_conditional_images(run_dir):
    model, config, _ = runs.load_run_model(run_dir, ema_std=0.05)
    guide, _, _ = runs.load_run_model(run_dir, ema_std=0.05)
    kw = dict(num_steps=3, sampler="ddpm", seed=4, batch_size=4, device="cpu", progress=False)
    labels = torch.tensor([1, 2, 3])
    guided = sample.generate(model, config, labels, cfg_scale=3.0, guide=guide, **kw)
    np.testing.assert_array_equal(guided, sample.generate(model, config, labels, cfg_scale=1.0, **kw))


def test_sample_not_a_run_folder(tmp_path, capsys):
    assert sample.main(["--result-dir", str(tmp_path)]) == 2
    assert "is not a run folder (no config.json)" in one_error_line(capsys.readouterr().err)


def test_fid_size_mismatch_is_reported_before_inception(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", arr_0=rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "b.npz", arr_0=rng.integers(0, 256, (4, 20, 20, 3), dtype=np.uint8))

    def no_inception(*a, **k):
        raise AssertionError("Inception must not be loaded before the inputs are checked")

    monkeypatch.setattr(evaluate_mod, "load_inception", no_inception)
    # A missing weights file must not matter either: the size check comes first.
    rc = evaluate_mod.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--inception-weights",
                            str(tmp_path / "missing.pt"), "--no-progress"])
    assert rc == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "image sizes differ" in line and "16x16" in line and "20x20" in line
    assert "FID:" not in captured.out


# ----------------------------------------------------------------------------------------------------
# 4. eval/sample_fid.py


def test_sample_fid_writes_npz(run_dir, capsys):
    args = ["--result-dir", run_dir, "--num-samples", "8", "--num-sampling-steps", "3", "--sampler", "ddim",
            "--ref", "none"]
    assert sample_fid.main(args) == 0
    out = capsys.readouterr().out
    assert "FID:" not in out
    tag = sample_fid.sample_tag(sample_fid.build_parser().parse_args(args))
    assert tag == "ema0.05-cfg1.5-ddim3-n8-seed42"
    path = os.path.join(run_dir, "fid", f"samples-{tag}.npz")
    with np.load(path) as z:
        assert z.files == ["arr_0"]
        images = z["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (8, SIZE, SIZE, 3)
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()  # gray -> RGB
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".part" in f or ".tmp" in f]


class FakeSampler:
    """Stands in for sample.generate: records the labels and returns images that depend on them."""

    def __init__(self):
        self.calls = []

    def __call__(self, model, config, labels, **kw):
        self.calls.append((labels.clone(), kw))
        rng = np.random.default_rng(int(labels.sum()) + len(labels))
        return rng.integers(0, 256, (len(labels), SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture
def fake_run(run_dir, tmp_path, monkeypatch):
    """A run folder with only config.json; load_run_model and generate are replaced (nothing is sampled)."""
    run = tmp_path / "000-fake"
    run.mkdir()
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    (run / "config.json").write_text(json.dumps(config))
    loads = []

    def fake_load(result_dir, **kw):
        loads.append(kw)
        config = runs.load_run_config(result_dir)
        return runs.model_from_config(config), config, "fake weights"

    fake = FakeSampler()
    monkeypatch.setattr(sample_fid, "load_run_model", fake_load)
    monkeypatch.setattr(sample_fid, "generate", fake)
    return run, fake, loads


def test_sample_fid_protocol_defaults_and_label_draw(fake_run, tmp_path, capsys):
    run, fake, loads = fake_run
    n = 5000
    assert sample_fid.main(["--result-dir", str(run), "--num-samples", str(n), "--ref", "none",
                            "--out", str(tmp_path / "a.npz")]) == 0
    assert sample_fid.main(["--result-dir", str(run), "--num-samples", str(n), "--ref", "none",
                            "--out", str(tmp_path / "b.npz")]) == 0
    assert sample_fid.main(["--result-dir", str(run), "--num-samples", str(n), "--ref", "none", "--seed", "43",
                            "--out", str(tmp_path / "c.npz")]) == 0
    (la, kw), (lb, _), (lc, _) = fake.calls
    # the paper's FID-10K protocol: EMA σ_rel 0.05, CFG 1.5, 250 DDPM steps, seed 42
    assert (loads[0]["ema_std"], loads[0]["ckpt_step"], loads[0]["step"]) == (0.05, None, None)
    assert (kw["cfg_scale"], kw["num_steps"], kw["sampler"], kw["seed"], kw["first_index"]) == (1.5, 250, "ddpm", 42, 0)
    assert torch.equal(la, lb) and not torch.equal(la, lc)  # seeded draw
    assert la.shape == (n,) and la.dtype == torch.int64
    counts = torch.bincount(la, minlength=NUM_CLASSES)
    assert len(counts) == NUM_CLASSES  # all labels in 0..9
    sd = math.sqrt(n * 0.1 * 0.9)
    assert (counts - n / NUM_CLASSES).abs().max() < 5 * sd, counts  # uniform
    with np.load(tmp_path / "a.npz") as za, np.load(tmp_path / "b.npz") as zb:
        assert za["arr_0"].shape == (n, SIZE, SIZE, 3) and np.array_equal(za["arr_0"], zb["arr_0"])
    assert "FID:" not in capsys.readouterr().out


class _StubInception(torch.nn.Module):
    """Tiny TorchScript stand-in for the FID Inception (24 features), loaded through --inception-weights."""

    def forward(self, x):
        if x.shape[2] != 299 or x.shape[3] != 299:
            raise RuntimeError("expected 299x299 input")
        p = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return torch.cat([p, p * p], dim=1)


def stub_inception(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(_StubInception()).save(str(path))
    return path


def test_sample_fid_against_statistics(fake_run, tmp_path, capsys):
    run, fake, _ = fake_run
    stub = stub_inception(tmp_path / "stub.pt")
    feats = np.random.default_rng(1).normal(size=(64, 24))
    ref = tmp_path / "ref.npz"
    save_statistics(ref, feats.mean(0), np.cov(feats, rowvar=False))
    out = tmp_path / "elsewhere" / "s.npz"  # not under RUN/fid: fid.jsonl must still be written there
    assert sample_fid.main(["--result-dir", str(run), "--num-samples", "8", "--ref", str(ref),
                            "--inception-weights", str(stub), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[-5:]] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    with np.load(out) as z:
        images = z["arr_0"]
    want = fid_from_images(images, str(ref), inception_weights=str(stub), device="cpu", progress=False)
    assert float(lines[-4].split()[1]) == pytest.approx(want, abs=1e-4)
    # statistics only, from a network without the spatial block: the other metrics say why they are missing
    assert "n/a" in lines[-5] and "pt_inception-2015-12-05" in lines[-5]
    assert "n/a" in lines[-3] and "n/a" in lines[-1] and "statistics only" in lines[-1]
    (record,) = [json.loads(line) for line in open(run / "fid" / "fid.jsonl")]
    assert record["fid"] == pytest.approx(want) and record["reference"] == str(ref) and record["cfg_scale"] == 1.5
    assert record["sfid"] is None and record["precision"] is None


def test_sample_fid_auto_reference_uses_given_weights(fake_run, tmp_path, monkeypatch):
    run, _, _ = fake_run
    seen = {}

    def fake_reference_statistics(name, out, **kw):
        seen.update(name=name, out=out, **kw)
        raise sample_fid.FIDError("stop here")

    monkeypatch.setattr(sample_fid, "reference_statistics", fake_reference_statistics)
    weights = stub_inception(tmp_path / "w.pt")
    assert sample_fid.main(["--result-dir", str(run), "--num-samples", "8", "--inception-weights", str(weights)]) == 2
    assert seen["name"] == "digits" and seen["image_size"] == SIZE and seen["inception_weights"] == str(weights)
    assert os.path.dirname(seen["out"]) == str(tmp_path / "refs") and seen["out"].endswith(".npz")


def bad_references(tmp):
    """Reference files that can only fail: each name -> the words its error line must contain."""
    (tmp / "garbage.npz").write_bytes(b"this is not a zip file at all" * 10)
    np.savez(tmp / "full.npz", mu=np.zeros(24), sigma=np.eye(24))
    whole = (tmp / "full.npz").read_bytes()
    (tmp / "truncated.npz").write_bytes(whole[: len(whole) // 2])
    np.savez(tmp / "dim64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.save(tmp / "array.npy", np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp / "object.npz", arr_0=np.array([{"a": 1}], dtype=object))
    np.savez(tmp / "strings.npz", mu=np.array(["a", "b"]), sigma=np.array([["a", "b"], ["c", "d"]]))
    np.savez(tmp / "nan.npz", mu=np.full(24, np.nan), sigma=np.eye(24))
    (tmp / "empty_folder").mkdir()
    return {"garbage.npz": "not a readable .npz", "truncated.npz": "not a readable .npz",
            "dim64.npz": "have 64 features but this Inception network gives 24",
            "array.npy": "single .npy array", "object.npz": "not a plain numeric array",
            "strings.npz": "must be numbers", "nan.npz": "non-finite", "empty_folder": "contains no images",
            "missing.npz": "reference not found"}


def test_sample_fid_rejects_every_bad_reference_before_sampling(fake_run, tmp_path, capsys):
    run, fake, _ = fake_run
    stub = stub_inception(tmp_path / "stub.pt")
    for name, words in bad_references(tmp_path).items():
        assert sample_fid.main(["--result-dir", str(run), "--num-samples", "8", "--ref", str(tmp_path / name),
                                "--inception-weights", str(stub)]) == 2, name
        assert words in one_error_line(capsys.readouterr().err), name
    assert not fake.calls  # the sampler never ran


def test_sample_fid_reads_a_class_subfolder_imagefolder_reference(fake_run, tmp_path, capsys):
    run, fake, _ = fake_run
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "ref" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / "ref" / c / f"{i}.png")
    assert sample_fid.main(["--result-dir", str(run), "--num-samples", "8", "--ref", str(tmp_path / "ref"),
                            "--inception-weights", str(stub_inception(tmp_path / "stub.pt")),
                            "--out", str(tmp_path / "s.npz")]) == 0
    out = capsys.readouterr().out
    assert "10 images 16x16" in out and "FID: " in out
    assert "Precision: 0" in out or "Precision: 1" in out  # images on both sides: precision/recall computed


@pytest.mark.parametrize("extra, message", [
    (["--ref", "{tmp}/missing.npz"], "reference not found"),
    (["--num-samples", "1"], "--num-samples must be at least 2"),
    (["--inception-weights", "{tmp}/missing.pt"], "Inception weights file not found"),
    (["--inception-weights", "{tmp}/garbage.pt"], "could not load Inception weights"),
    (["--inception-classifier", "{tmp}/garbage.pt"], "not usable as the Inception classifier"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
    (["--cfg-scale", "inf"], "--cfg-scale must be a finite number"),
    (["--ema-std", "nan"], "--ema-std must be a finite number"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--seed", str(10**23)], "--seed must be an integer in 0..4294967295"),
    (["--seed", "1e23"], "invalid int value"),
    (["--num-sampling-steps", "0"], "--num-sampling-steps must be in 1..1000"),
    (["--guidance-interval", "5", "1"], "--guidance-interval"),
    (["--guide", "ema:x"], "--guide ema:x: ema: needs a number"),
    (["--guide", "{tmp}/nowhere"], "not a run folder"),
    (["--sampler", "euler"], "invalid choice"),
])
def test_sample_fid_bad_input_before_sampling(fake_run, tmp_path, capsys, extra, message):
    run, fake, _ = fake_run
    (tmp_path / "garbage.pt").write_bytes(b"not a TorchScript file")
    extra = [e.format(tmp=tmp_path) for e in extra]
    with pytest.raises(SystemExit) if message == "invalid int value" or message == "invalid choice" else \
            contextlib.nullcontext() as exited:
        assert sample_fid.main(["--result-dir", str(run), *extra]) == 2
    if exited is not None:
        assert exited.value.code == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not fake.calls


# ----------------------------------------------------------------------------------------------------
# 5. runs.load_run_model errors


def test_load_run_model_errors(run_dir, tmp_path):
    with pytest.raises(runs.RunError, match="run folder not found: .*nope"):
        runs.load_run_model(str(tmp_path / "nope"))
    with pytest.raises(runs.RunError, match=r"is not a run folder \(no config.json\); pass a folder made by train.py"):
        runs.load_run_model(str(tmp_path))
    with pytest.raises(runs.RunError, match=rf"no checkpoint at step 5 .*available: {CKPT_EVERY}, {NUM_STEPS}"):
        runs.load_run_model(run_dir, ckpt_step=5)
    with pytest.raises(ValueError, match="after the last snapshot"):
        runs.load_run_model(run_dir, ema_std=0.05, step=NUM_STEPS + 1)
    assert issubclass(runs.RunError, ValueError)
