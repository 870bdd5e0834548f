import math

import pytest
import torch
import torch.nn.functional as F

import mp_layers
from fast_paths import apply_fast_paths
from helpers import interaction_configs, one_thread, rms, tiny_dit
from models import MODEL_NAMES, build_model, count_parameters, patchify, sincos_pos_embed_2d, unpatchify
from mp_layers import MPConfig, MPEmbedding, MPLinear

PARAMETER_COUNTS = {  # docs/design.md, "Final layer": (all flags off, all eight on)
    "DiT-XXS/2": (1_969_408, 2_097_416),
    "DiT-XS/2": (7_608_832, 7_864_840),
    "DiT-S/4": (32_898_816, 33_282_830),
    "DiT-S/2": (32_843_520, 33_227_534),
    "DiT-B/2": (130_567_680, 131_335_694),
}


@pytest.mark.parametrize("name", PARAMETER_COUNTS)
def test_parameter_counts_match_design(name):
    off, on = PARAMETER_COUNTS[name]
    with torch.device("meta"):
        assert count_parameters(build_model(name, in_channels=4, input_size=16)) == off
        assert count_parameters(build_model(name, in_channels=4, input_size=16, mp=MPConfig.all_on())) == on


def test_registry_has_all_eighteen_models():
    assert len(MODEL_NAMES) == 18
    assert {"DiT-XXS/2", "DiT-XS/2", "DiT-S/4", "DiT-B/8", "DiT-L/2", "DiT-XL/4"} <= set(MODEL_NAMES)


def test_state_dict_holds_exactly_the_parameters():
    model = tiny_dit(MPConfig.all_on())
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()}


def _fwd_bwd(model, dtype=None):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4)
    t = torch.randint(0, 1000, (3,))
    y = torch.randint(0, 6, (3,))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        out = model(x, t, y)
        loss = out.float().square().mean() + out.float().mean()
    loss.backward()
    return out, loss


def test_interaction_coverage_is_generated_from_the_config():
    n = len(MPConfig.switch_names())
    configs = interaction_configs()
    assert len(configs) == 2 + n + n + n * (n - 1) // 2
    assert len(set(configs.values())) == len(configs)  # all different
    assert MPConfig.all_on() in configs.values()  # the set --use-all-mp trains is among them


@pytest.mark.parametrize("name", list(interaction_configs()))
def test_switch_interactions_run_forward_and_backward_in_fp32_and_bf16(name):
    """Every switch alone, left out of all-on, and every pair: the fast model trains with finite values in
    fp32 and bf16 autocast, and its fp32 output is the plain model's."""
    mp = interaction_configs()[name]
    with one_thread():
        _check_interaction(name, mp)


def _check_interaction(name, mp):
    torch.manual_seed(1)
    plain = tiny_dit(mp, depth=1, width=16, heads=2)
    for p in plain.parameters():  # leave the zero-init state so every layer gets a gradient
        torch.nn.init.normal_(p, std=0.3)
    model = apply_fast_paths(tiny_dit(mp, depth=1, width=16, heads=2))
    model.load_state_dict(plain.state_dict())
    for dtype in (None, torch.bfloat16):
        model.zero_grad(set_to_none=True)
        out, loss = _fwd_bwd(model, dtype)
        assert out.shape == (3, 4, 4, 4)
        assert torch.isfinite(out.float()).all() and torch.isfinite(loss), (name, dtype)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), (name, dtype)
        if dtype is None:
            ref, _ = _fwd_bwd(plain)
            assert (out - ref).norm() / ref.norm() < 1e-5, name


def test_bf16_autocast_output_follows_fp32():
    model = tiny_dit(MPConfig.all_on(), width=64, heads=4)
    for p in model.parameters():  # leave the zero-init state so the output is not trivially 0
        torch.nn.init.normal_(p, std=0.5)
    model.project_forced_weights_()
    x, t, y = torch.randn(4, 2, 4, 4), torch.randint(0, 1000, (4,)), torch.randint(0, 5, (4,))
    model.eval()
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, y).float()
    assert (low - ref).norm() / ref.norm() < 0.05


# ---------------------------------------------------------------------------------------------------
# Magnitudes (docs/design.md, "Primitives" to "Final layer").


def test_weight_normalized_linear_preserves_unit_rms():
    torch.manual_seed(0)
    for fan_in in (256, 1024):
        layer = MPLinear(fan_in, 512, MPConfig(use_weight_normalization=True))
        x = torch.randn(64, fan_in)
        assert rms(layer(x)) == pytest.approx(1.0, rel=0.05)


def test_forced_wn_without_wn_preserves_unit_rms():
    # The reference multiplies unit input by ~sqrt(fan_in) here; we divide by sqrt(fan_in).
    torch.manual_seed(0)
    layer = MPLinear(256, 512, MPConfig(use_forced_weight_normalization=True))
    x = torch.randn(64, 256)
    assert rms(layer(x)) == pytest.approx(1.0, rel=0.05)
    assert rms(F.linear(x, layer.weight)) == pytest.approx(16.0, rel=0.05)  # what the reference computes


@pytest.mark.parametrize("mp", [MPConfig.all_on(), MPConfig(use_forced_weight_normalization=True),
                                MPConfig(use_forced_weight_normalization=True, use_mp_embedding=True)])
def test_forced_wn_rows_have_unit_rms_after_an_optimizer_step(mp):
    torch.manual_seed(0)
    model = tiny_dit(mp, width=32)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    weights = [m.weight for m in model.modules()
               if isinstance(m, (MPLinear, MPEmbedding)) and m.forced_weight_norm]
    assert weights
    max_drift = 0.0
    for _ in range(4):  # adaLN-Zero: gradients reach the zero-initialised layers one step at a time
        model.zero_grad()
        _fwd_bwd(model)
        opt.step()
        moved = [w.detach().clone() for w in weights]
        max_drift = max(max_drift, *((w.square().mean(-1).sqrt() - 1).abs().max().item() for w in moved))
        model.project_forced_weights_()
        for before, w in zip(moved, weights):
            row_rms = w.detach().square().mean(-1).sqrt()
            before_rms = before.square().mean(-1).sqrt()
            zero_rows = before_rms == 0  # zero-init rows that no gradient has reached yet stay 0
            # rows just leaving zero init have tiny norms, where the 1e-4 of normalize() still shows
            fresh_rows = (before_rms > 0) & (before_rms < 0.5)
            assert torch.allclose(row_rms[~zero_rows & ~fresh_rows], torch.ones(1), atol=1e-4)
            assert (row_rms[fresh_rows] > 0.99).all() and (row_rms[zero_rows] == 0).all()
            # the projection only rescales rows
            assert torch.allclose(F.normalize(before, dim=-1), F.normalize(w.detach(), dim=-1), atol=1e-5)
    assert max_drift > 1e-3  # the steps did move the row norms away from 1


def test_mp_sum_and_mp_silu_preserve_unit_rms():
    torch.manual_seed(0)
    a, b = torch.randn(1_000_000), torch.randn(1_000_000)
    for t in (0.3, 0.5, 0.8):
        assert rms(mp_layers.mp_sum(a, b, t)) == pytest.approx(1.0, rel=0.02)
    assert rms(mp_layers.mp_silu(a)) == pytest.approx(1.0, rel=0.02)
    assert rms(F.silu(a)) == pytest.approx(0.596, rel=0.02)


def test_normalize_gives_unit_rms_rows_in_fp32_for_bf16_input():
    x = (torch.randn(8, 300) * 7).bfloat16()
    y = mp_layers.normalize(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float().square().mean(-1).sqrt(), torch.ones(8), atol=1e-2)


def test_cosine_attention_sees_unit_rms_queries_and_keys(monkeypatch):
    seen = {}
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen["q"], seen["k"] = q, k
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(mp_layers.F, "scaled_dot_product_attention", spy)
    attn = mp_layers.Attention(64, 4, MPConfig(use_cosine_attention=True))
    attn(torch.randn(2, 10, 64) * 3)
    for key in ("q", "k"):
        per_head_rms = seen[key].square().mean(-1).sqrt()  # (B, H, T)
        assert torch.allclose(per_head_rms, torch.ones_like(per_head_rms), atol=1e-3)
    attn_plain = mp_layers.Attention(64, 4, MPConfig())
    attn_plain(torch.randn(2, 10, 64) * 3)
    assert not torch.allclose(seen["q"].square().mean(-1).sqrt(), torch.ones(1), atol=0.1)


def _block_inputs_and_outputs(model, x, t, y):
    records = []
    hooks = [b.register_forward_hook(lambda m, inp, out: records.append((inp[0], out))) for b in model.blocks]
    with torch.no_grad():
        model(x, t, y)
    for h in hooks:
        h.remove()
    return records


def test_all_switches_tokens_enter_block_one_at_unit_rms_and_shrink_0845_per_block():
    torch.manual_seed(0)
    model = build_model("DiT-XS/2", in_channels=4, input_size=16, mp=MPConfig.all_on()).eval()
    x, t, y = torch.randn(8, 4, 16, 16), torch.randint(0, 1000, (8,)), torch.randint(0, 1000, (8,))
    records = _block_inputs_and_outputs(model, x, t, y)
    assert rms(records[0][0]) == pytest.approx(1.0, rel=0.05)
    expected = (0.7 / math.sqrt(0.7**2 + 0.3**2)) ** 2
    assert expected == pytest.approx(0.845, abs=1e-3)
    for inp, out in records:
        assert rms(out) / rms(inp) == pytest.approx(expected, rel=1e-4)


def test_without_mp_the_tokens_are_not_unit_rms():
    torch.manual_seed(0)
    model = build_model("DiT-XS/2", in_channels=4, input_size=16).eval()
    x, t, y = torch.randn(8, 4, 16, 16), torch.randint(0, 1000, (8,)), torch.randint(0, 1000, (8,))
    records = _block_inputs_and_outputs(model, x, t, y)
    assert abs(rms(records[0][0]) - 1.0) > 0.1
    assert rms(records[-1][1]) == pytest.approx(rms(records[0][0]), rel=1e-5)  # plain residual, gates 0


# ---------------------------------------------------------------------------------------------------
# Structure.


def test_patchify_feature_order_and_inverse():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    patches = patchify(x, 2)
    assert patches.shape == (2, 4, 12)
    # first token = top-left patch; features ordered (row-in-patch, column-in-patch, channel)
    expected = torch.stack([x[0, c, r, col] for r in range(2) for col in range(2) for c in range(3)])
    assert torch.equal(patches[0, 0], expected)
    assert torch.equal(patches[0, 1, :3], x[0, :, 0, 2])  # second token = next patch to the right
    assert torch.equal(unpatchify(patches, 2, 3, 2), x)


def test_pos_embed_is_mae_sincos():
    pos = sincos_pos_embed_2d(8, 3)  # tokens in row-major order
    assert pos.shape == (9, 8)
    token = 1 * 3 + 2  # row 1, column 2
    omega = torch.tensor([1.0, 1e-2], dtype=torch.float64)
    expected = torch.cat([torch.sin(2 * omega), torch.cos(2 * omega), torch.sin(1 * omega), torch.cos(1 * omega)])
    assert torch.allclose(pos[token].double(), expected, atol=1e-6)
    model = tiny_dit(MPConfig(use_mp_pos_enc=True))
    assert torch.allclose(model.pos_embed.square().mean(-1).sqrt(), torch.ones(4), atol=1e-4)


def test_zero_init_output_and_cfg_scale_one_equals_conditional():
    model = tiny_dit(MPConfig.all_on()).eval()
    x, t, y = torch.randn(3, 2, 4, 4), torch.randint(0, 1000, (3,)), torch.tensor([0, 1, 4])
    with torch.no_grad():
        assert torch.count_nonzero(model(x, t, y)) == 0  # adaLN-Zero with zero gains
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        cond = model(x, t, y)
        null = torch.full_like(y, model.num_classes)
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 1.0)
        assert torch.allclose(guided[:3], cond, atol=1e-5)
        guided4 = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0)
        uncond = model(x, t, null)
        assert torch.allclose(guided4[:3, :2], uncond[:, :2] + 4 * (cond[:, :2] - uncond[:, :2]), atol=1e-4)
        assert torch.allclose(guided4[3:, 2:], cond[:, 2:], atol=1e-5)  # variance from the conditional half


def test_eval_weight_cache_follows_weight_updates():
    torch.manual_seed(0)
    model = tiny_dit(MPConfig.all_on())
    for p in model.parameters():
        torch.nn.init.normal_(p)
    x, t, y = torch.randn(2, 2, 4, 4), torch.tensor([5, 900]), torch.tensor([0, 3])
    model.eval()
    with torch.no_grad():
        first = model(x, t, y)
        assert torch.equal(model(x, t, y), first)
        other = tiny_dit(MPConfig.all_on())
        for p in other.parameters():
            torch.nn.init.normal_(p)
        model.load_state_dict(other.state_dict())
        expected = other.eval()(x, t, y)
        assert torch.allclose(model(x, t, y), expected, atol=1e-6)
        assert not torch.allclose(first, expected)


def test_class_dropout_only_in_training():
    model = tiny_dit(MPConfig.all_on())
    for p in model.parameters():
        torch.nn.init.normal_(p)
    x, t, y = torch.zeros(200, 2, 4, 4), torch.zeros(200, dtype=torch.long), torch.zeros(200, dtype=torch.long)
    torch.manual_seed(0)
    with torch.no_grad():
        train_out = model.train()(x, t, y)
        eval_out = model.eval()(x, t, y)
        null_out = model(x, t, torch.full_like(y, model.num_classes))
    dropped = (train_out - null_out).flatten(1).abs().amax(1) < 1e-5
    assert 5 <= dropped.sum() <= 40  # about 10 % of 200
    assert torch.allclose(train_out[~dropped], eval_out[~dropped], atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Errors.


def test_unknown_model_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'DiT-M/2'.*DiT-XS/2.*DiT-XL/8"):
        build_model("DiT-M/2", in_channels=4, input_size=16)


def test_input_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="input size 18 is not divisible by the patch size 4"):
        build_model("DiT-XS/4", in_channels=4, input_size=18)


def test_class_index_out_of_range():
    model = tiny_dit().eval()
    x, t = torch.randn(2, 2, 4, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="class label out of range.*5 classes"):
        model(x, t, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="class label out of range"):
        model(x, t, torch.tensor([-1, 0]))


def test_wrong_input_shape():
    with pytest.raises(ValueError, match="does not match the model"):
        tiny_dit()(torch.randn(2, 3, 4, 4), torch.tensor([1, 2]), torch.tensor([0, 1]))


def test_mp_config_round_trip_and_cli():
    import argparse
    parser = argparse.ArgumentParser()
    MPConfig.add_arguments(parser)
    args = parser.parse_args(["--use-cosine-attention", "--use-mp-silu"])
    mp = MPConfig.from_args(args)
    assert mp.enabled() == ["use_cosine_attention", "use_mp_silu"]
    assert MPConfig.from_dict(mp.to_dict()) == mp
    assert MPConfig.from_args(parser.parse_args(["--use-all-mp"])) == MPConfig.all_on()
    with pytest.raises(ValueError, match="unknown MP switches"):
        MPConfig.from_dict({"use_magic": True})
