"""The follow-up paper's conditioning options: modulation parts (scale, shift, rotation, gate), MP Fourier
timestep features, and the learning rate per kind of parameter."""
import itertools
import math

import pytest
import torch

import logs
import training
from fast_paths import apply_fast_paths
from helpers import interaction_configs, one_thread, tiny_dit
from models import build_model, count_parameters
from mp_layers import MODULATION_PARTS, MPConfig, MPFourier, parse_modulation, rotate_pairs

EIGHT = {n: True for n in MPConfig.all_mp_names()}
PART_SETS = ["+".join(c) for k in range(1, len(MODULATION_PARTS) + 1)
             for c in itertools.combinations(MODULATION_PARTS, k)]
MODULATIONS = ["adaln", *PART_SETS]

# All eight switches, MP Fourier instead of the learned table, in_channels 4, input 16, 1000 classes: the
# counts of the follow-up paper's code (scale+shift+gate, scale+rotation+gate).
FOLLOW_UP_COUNTS = {
    "DiT-XS/2": (7_608_871, 7_182_887),
    "DiT-S/4": (32_849_739, 31_006_539),
    "DiT-S/2": (32_794_443, 30_951_243),
    "DiT-B/2": (130_174_539, 122_801_739),
}


def count(name, **options):
    with torch.device("meta"):
        return count_parameters(build_model(name, in_channels=4, input_size=16, mp=MPConfig(**options)))


# ----------------------------------------------------------------------------------------------------
# Parameter counts.


@pytest.mark.parametrize("name", FOLLOW_UP_COUNTS)
def test_parameter_counts_with_mp_fourier_match_the_follow_up_code(name):
    shift_gate, rotation_gate = FOLLOW_UP_COUNTS[name]
    assert count(name, **EIGHT, use_mp_fourier=True, modulation="scale+shift+gate") == shift_gate
    assert count(name, **EIGHT, use_mp_fourier=True, modulation="scale+rotation+gate") == rotation_gate
    assert 1 - rotation_gate / shift_gate == pytest.approx(0.056, abs=0.001)  # the paper's "about 5.4 %"


def test_learned_table_and_scale_shift_gate_has_one_gain_per_part():
    assert count("DiT-XS/2", **EIGHT, modulation="scale+shift+gate") == 7_864_871
    assert count("DiT-XS/2", **EIGHT) == 7_864_840  # adaln: one gain per block
    assert count("DiT-XS/2", **EIGHT, modulation="adaln") == 7_864_840


# ----------------------------------------------------------------------------------------------------
# The configuration.


def test_modulation_is_normalised_and_checked():
    assert parse_modulation("gate+scale") == "scale+gate"
    assert MPConfig(modulation="rotation+scale").modulation_parts == ("scale", "rotation")
    assert MPConfig().modulation_parts == ()
    for bad in ["", "scale+scale", "adaln+gate", "scale+tilt", "Scale"]:
        with pytest.raises(ValueError, match="is not adaln or a set of parts from scale, shift, rotation, gate"):
            MPConfig(modulation=bad)


def test_a_config_saved_before_the_options_existed_loads_with_their_defaults():
    old = {name: True for name in MPConfig.all_mp_names()}  # the eight-switch code's config.json "mp"
    mp = MPConfig.from_dict(old)
    assert mp == MPConfig.all_on() and mp.modulation == "adaln" and not mp.use_mp_fourier
    new = MPConfig(**EIGHT, use_mp_fourier=True, modulation="scale+rotation+gate")
    assert MPConfig.from_dict(new.to_dict()) == new


def test_cli_options_and_one_error_line(capsys):
    import argparse
    parser = argparse.ArgumentParser()
    MPConfig.add_arguments(parser)
    mp = MPConfig.from_args(parser.parse_args(["--use-all-mp", "--modulation", "gate+rotation+scale",
                                               "--use-mp-fourier"]))
    assert mp == MPConfig(**EIGHT, use_mp_fourier=True, modulation="scale+rotation+gate")
    assert "modulation scale+rotation+gate" in mp.describe()
    assert not MPConfig.from_args(parser.parse_args(["--use-all-mp"])).use_mp_fourier
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--modulation", "scale+tilt"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: argument --modulation: modulation 'scale+tilt' is not adaln" in err, err


# ----------------------------------------------------------------------------------------------------
# Rotation and identity at init.


def test_rotation_keeps_every_token_norm_exactly_and_is_the_identity_at_angle_zero():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 7, 16, dtype=torch.float64, generator=g) * 5
    angles = torch.randn(3, 8, dtype=torch.float64, generator=g) * 100
    out = rotate_pairs(h, angles)
    assert torch.allclose(out.norm(dim=-1), h.norm(dim=-1), rtol=1e-12, atol=0)
    assert (out - h).abs().max() > 1  # it did rotate
    assert torch.equal(rotate_pairs(h, torch.zeros(3, 8, dtype=torch.float64)), h)
    # the pair (i, i + D/2) turns by θ_i
    i, b = 3, 1
    c, s = math.cos(angles[b, i]), math.sin(angles[b, i])
    assert out[b, :, i].tolist() == pytest.approx((h[b, :, i] * c - h[b, :, i + 8] * s).tolist(), rel=1e-12)
    assert out[b, :, i + 8].tolist() == pytest.approx((h[b, :, i] * s + h[b, :, i + 8] * c).tolist(), rel=1e-12)


class NoModulation(torch.nn.Module):
    def __init__(self, branches):
        super().__init__()
        self.branches = branches

    def forward(self, a):
        return [{} for _ in range(self.branches)]


@pytest.mark.parametrize("switches", ["none", "eight"])
@pytest.mark.parametrize("parts", PART_SETS)
def test_every_part_is_the_identity_at_init(parts, switches):
    """At init the model equals the same model with its modulation layers removed (float64); the other
    weights are random, so the output is not trivially zero."""
    mp = MPConfig(**(EIGHT if switches == "eight" else {}), modulation=parts)
    torch.manual_seed(0)
    model = tiny_dit(mp, in_channels=3, input_size=8).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".modulation." not in name:
                p.normal_(0, 0.5)
    x, t, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 5])
    with torch.no_grad():
        out = model(x, t, y)
        for block in model.blocks:
            block.modulation = NoModulation(2)
        model.final_layer.modulation = NoModulation(1)
        bare = model(x, t, y)
    assert bare.abs().max() > 1e-4
    assert torch.allclose(out, bare, rtol=1e-12, atol=1e-14)


def test_mp_fourier_features_have_unit_rms_and_are_saved():
    torch.manual_seed(0)
    features = MPFourier(256)(torch.arange(1000))
    assert features.shape == (1000, 256)
    assert features.square().mean().sqrt().item() == pytest.approx(1.0, rel=0.02)
    model = tiny_dit(MPConfig(use_mp_fourier=True))
    assert {"t_embedder.fourier.freqs", "t_embedder.fourier.phases"} <= set(model.state_dict())
    other = tiny_dit(MPConfig(use_mp_fourier=True))
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.t_embedder.fourier.freqs, model.t_embedder.fourier.freqs)


# ----------------------------------------------------------------------------------------------------
# Every modulation set with the switch interactions: finite in fp32 and bf16, fast equals plain.


def _fwd_bwd(model, autocast):
    torch.manual_seed(0)
    x, t, y = torch.randn(3, 2, 4, 4), torch.randint(0, 1000, (3,)), torch.randint(0, 6, (3,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, y)
    out.float().square().mean().backward()
    return out


@pytest.mark.parametrize("modulation", MODULATIONS)
def test_every_modulation_with_the_switch_interactions_trains_in_fp32_and_bf16(modulation):
    """Each modulation set with every switch alone, left out of all-on, and every pair: the fast model's
    forward and backward are finite in fp32 and under bf16 autocast. (tests/test_fast_paths.py holds the
    fast model equal to the plain one for every modulation set.)"""
    with one_thread():
        for name, switches in interaction_configs().items():
            mp = MPConfig(**{n: getattr(switches, n) for n in MPConfig.switch_names()}, modulation=modulation)
            torch.manual_seed(1)
            model = apply_fast_paths(tiny_dit(mp, depth=1, width=16, heads=2))
            with torch.no_grad():
                for p in model.parameters():  # leave the zero-init state so that every layer gets a gradient
                    p.normal_(0, 0.3)
            for autocast in (False, True):
                model.zero_grad(set_to_none=True)
                out = _fwd_bwd(model, autocast)
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                assert torch.isfinite(out.float()).all() and grads, (modulation, name, autocast)
                assert all(torch.isfinite(g).all() for g in grads), (modulation, name, autocast)


# ----------------------------------------------------------------------------------------------------
# Learning rates per kind of parameter.


def test_one_adam_step_moves_mp_weights_at_the_mp_rate_and_plain_weights_at_the_plain_rate():
    torch.manual_seed(0)
    model = tiny_dit(MPConfig(use_weight_normalization=True))  # the label table stays plain
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    opt, sched = training.make_optimizer(model, 1e-4, 0, 0, torch.device("cpu"), mp_lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.class_dropout = 0.0
    _fwd_bwd(model, False)
    opt.step()
    # Adam's first step moves every entry with a clear gradient by the rate: |Δ| = lr·|g|/(|g| + eps).
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert moved["y_embedder.weight"] == pytest.approx(1e-4, rel=1e-3)
    for n in ["x_embedder.weight", "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc2.weight", "final_layer.linear.gain"]:
        assert moved[n] == pytest.approx(1e-2, rel=1e-3), n
    groups = {g["name"]: g for g in opt.param_groups}
    assert (groups["mp"]["lr"], groups["plain"]["lr"]) == (1e-2, 1e-4)
    assert len(groups["plain"]["params"]) == 1  # only the label table
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_one_rate_for_all_is_one_group_as_before():
    model = tiny_dit(MPConfig.all_on())
    opt, _ = training.make_optimizer(model, 3e-4, 0, 0, torch.device("cpu"))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 3e-4
    opt, _ = training.make_optimizer(model, 1e-4, 0, 0, torch.device("cpu"), mp_lr=1e-2)
    assert [g["name"] for g in opt.param_groups] == ["mp"]  # all eight: every parameter is an MP one


def test_a_modulation_run_trains_at_the_mp_rate_resumes_and_samples(tmp_path):
    """--use-all-mp without an lr flag: the log states 1e-2 for the MP group; the run folder records the
    modulation and MP Fourier, resumes with its two rates, and sample.py rebuilds the model from it."""
    import json

    import sample
    import train
    results = tmp_path / "results"
    common = ["--model", "DiT-XS/8", "--batch-size", "8", "--num-workers", "0", "--log-every", "1",
              "--magnitude-every", "1000", "--ema-snapshot-every", "1", "--ckpt-every", "1"]
    assert train.main([*common, "--num-steps", "2", "--use-all-mp", "--use-mp-fourier", "--modulation",
                       "rotation+scale+gate", "--results-dir", str(results)]) == 0
    (run,) = results.iterdir()
    log = (run / "log.txt").read_text()
    assert "lr 0.01 for the" in log and "MP parameters" in log and "modulation scale+rotation+gate" in log
    config = json.loads((run / "config.json").read_text())
    assert config["mp"]["modulation"] == "scale+rotation+gate" and config["mp"]["use_mp_fourier"]
    assert (config["args"]["lr"], config["args"]["mp_lr"]) == (1e-4, 1e-2)
    assert train.main(["--resume", str(run), "--num-steps", "3"]) == 0
    assert [m["mp_lr"] for m in logs.read_jsonl(str(run / "metrics.jsonl"))][-1] == pytest.approx(1e-2)
    assert sample.main(["--result-dir", str(run), "--class-label", "1", "--num-samples", "2",
                        "--num-sampling-steps", "2", "--sampler", "ddim"]) == 0


def test_lr_alone_is_one_rate_and_old_runs_keep_theirs():
    import train
    from config import TrainConfig
    rates = lambda *argv: (lambda c: (c.lr, c.mp_lr))(TrainConfig.from_args(train.build_parser().parse_args(argv)))  # noqa: E731
    assert rates("--lr", "3e-4") == (3e-4, 3e-4)
    assert rates() == (1e-4, 1e-2)
    assert rates("--mp-lr", "5e-3") == (1e-4, 5e-3)
    old = TrainConfig.from_dict({"lr": 1e-4})  # config.json without mp_lr
    assert (old.lr, old.mp_lr) == (1e-4, 1e-4)
