"""Tests for diffusion/: forward process, VB loss, respacing, samplers, CFG entry point.

Reference quantities are computed here from docs/design.md's formulas (own betas, own KL), not taken from
the implementation. Shapes are tiny so the file runs in seconds on a slow CPU.
"""

import math

import numpy as np
import pytest
import torch

from diffusion import create_diffusion, sample_images, space_timesteps

T = 1000
BETAS = np.linspace(1e-4, 0.02, T, dtype=np.float64)
ABAR = np.cumprod(1.0 - BETAS)


def _col(values, ndim):
    """(B,) numpy -> (B, 1, ..., 1) float64 tensor."""
    return torch.as_tensor(np.asarray(values, dtype=np.float64)).view(-1, *([1] * (ndim - 1)))


# ----------------------------------------------------------------------------- forward process

def test_q_sample_mean_and_variance():
    d = create_diffusion("")
    n = 20000
    x0_values = torch.tensor([0.7, -1.3, 2.0], dtype=torch.float64)
    t = torch.tensor([0, 300, 999])
    x0 = x0_values[:, None].expand(3, n).contiguous()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xt = d.q_sample(x0, t, noise)

    abar = ABAR[t.numpy()]
    expected_mean = np.sqrt(abar) * x0_values.numpy()
    expected_var = 1.0 - abar
    mean, var = xt.mean(dim=1).numpy(), xt.var(dim=1).numpy()
    # means within 5 standard errors, variances within 5% (sampling error ≈ 1%)
    assert np.all(np.abs(mean - expected_mean) < 5 * np.sqrt(expected_var / n)), (mean, expected_mean)
    np.testing.assert_allclose(var, expected_var, rtol=0.05)


# ----------------------------------------------------------------------------- VB term

def _stub_output(x):
    """A model whose output is a known function of its input: ε̂ = 0.3 x + 0.1, v = tanh(x)."""
    return torch.cat([0.3 * x + 0.1, torch.tanh(x)], dim=1)


def _reference_model_posterior(xt, t_np):
    """Mean and log-variance of p(x_{t−1}|x_t) for _stub_output, from the formulas of docs/design.md, "Diffusion"."""
    nd = xt.ndim
    abar, abar_prev = ABAR[t_np], np.where(t_np > 0, ABAR[np.maximum(t_np - 1, 0)], 1.0)
    beta = BETAS[t_np]
    post_var = beta * (1 - abar_prev) / (1 - abar)
    post_var_clipped = np.where(t_np == 0, BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1]), post_var)
    eps_hat, v = _stub_output(xt).chunk(2, dim=1)
    x0_hat = (xt - _col(np.sqrt(1 - abar), nd) * eps_hat) / _col(np.sqrt(abar), nd)
    coef1 = _col(np.sqrt(abar_prev) * beta / (1 - abar), nd)
    coef2 = _col(np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar), nd)
    frac = (v + 1) / 2
    log_var = frac * _col(np.log(beta), nd) + (1 - frac) * _col(np.log(post_var_clipped), nd)
    return coef1 * x0_hat + coef2 * xt, log_var, (coef1, coef2, _col(post_var, nd))


def test_vb_equals_closed_form_gaussian_kl_in_bits_per_dim():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 500, 999])
    out = d.training_losses(lambda x, tt: _stub_output(x), x0, t, noise=noise)

    t_np = t.numpy()
    xt = _col(np.sqrt(ABAR[t_np]), 4) * x0 + _col(np.sqrt(1 - ABAR[t_np]), 4) * noise
    model_mean, model_log_var, (coef1, coef2, post_var) = _reference_model_posterior(xt, t_np)
    true_mean = coef1 * x0 + coef2 * xt
    # KL(N(m1, s1²) || N(m2, s2²)) = log(s2/s1) + (s1² + (m1 − m2)²) / (2 s2²) − 1/2, per element
    s1_sq, s2_sq = post_var, torch.exp(model_log_var)
    kl = 0.5 * torch.log(s2_sq / s1_sq) + (s1_sq + (true_mean - model_mean) ** 2) / (2 * s2_sq) - 0.5
    expected_vb = kl.mean(dim=(1, 2, 3)) / math.log(2)
    expected_mse = ((noise - (0.3 * xt + 0.1)) ** 2).mean(dim=(1, 2, 3))

    for key in ("loss", "mse", "vb"):
        assert out[key].shape == (4,)
    torch.testing.assert_close(out["vb"], expected_vb, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["mse"], expected_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(out["loss"], expected_mse + expected_vb, rtol=1e-6, atol=0)
    assert torch.all(out["vb"] > 0)


def test_vb_at_t0_is_discretised_gaussian_decoder_nll():
    d = create_diffusion("")
    g = torch.Generator().manual_seed(2)
    # x0 on the 8-bit grid of [-1, 1], including both edge bins
    x0 = (torch.randint(0, 256, (3, 1, 4, 4), generator=g).double() / 127.5 - 1.0)
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.zeros(3, dtype=torch.long)
    # ε̂ = noise keeps the decoder mean close to x0, so bins carry real probability
    model_fn = lambda x, tt: torch.cat([noise, torch.full_like(x, 0.2)], dim=1)  # noqa: E731
    vb = d.training_losses(model_fn, x0, t, noise=noise)["vb"]

    # Model decoder: mean x̂0 (= x0 here, coef1 = 1 at t = 0), log σ² = frac·log β_0 + (1 − frac)·log β̃_1.
    post_var_1 = BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])
    frac = 0.6
    std = math.exp(0.5 * (frac * math.log(BETAS[0]) + (1 - frac) * math.log(post_var_1)))
    mean = x0  # x̂0 = (x_t − sqrt(1 − ᾱ_0) noise) / sqrt(ᾱ_0) = x0
    half = 1.0 / 255
    upper = torch.where(x0 > 0.999, torch.full_like(x0, math.inf), x0 + half)
    lower = torch.where(x0 < -0.999, torch.full_like(x0, -math.inf), x0 - half)
    prob = torch.special.ndtr((upper - mean) / std) - torch.special.ndtr((lower - mean) / std)
    expected = -torch.log(prob).mean(dim=(1, 2, 3)) / math.log(2)
    # ADM uses a tanh approximation of Φ, hence the loose tolerance
    torch.testing.assert_close(vb, expected, rtol=1e-2, atol=0)

    # The same inputs at t = 1 use the KL branch and give a clearly different value.
    vb_t1 = d.training_losses(model_fn, x0, torch.ones(3, dtype=torch.long), noise=noise)["vb"]
    assert torch.all((vb_t1 - vb).abs() > 0.1 * vb.abs())


def test_vb_gradient_reaches_only_the_variance_channels():
    eps_scale = torch.tensor(0.5, requires_grad=True)
    var_scale = torch.tensor(0.7, requires_grad=True)

    def model_fn(x, t):
        return torch.cat([eps_scale * x, torch.tanh(var_scale * x)], dim=1)

    d = create_diffusion("")
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 2, 2, 2, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    out = d.training_losses(model_fn, x0, torch.tensor([0, 3, 200, 900]), noise=noise)

    g_eps, g_var = torch.autograd.grad(out["vb"].sum(), [eps_scale, var_scale], retain_graph=True,
                                       allow_unused=True)
    assert g_eps is None or g_eps.item() == 0.0
    assert g_var is not None and g_var.abs().item() > 0
    # The ε parameters learn from the MSE alone: d(loss)/d(eps) == d(mse)/d(eps).
    (g_loss_eps,) = torch.autograd.grad(out["loss"].sum(), [eps_scale], retain_graph=True)
    (g_mse_eps,) = torch.autograd.grad(out["mse"].sum(), [eps_scale])
    assert g_mse_eps.abs().item() > 0
    torch.testing.assert_close(g_loss_eps, g_mse_eps)


# ----------------------------------------------------------------------------- respacing

def test_respacing_250_keeps_evenly_strided_original_steps():
    d = create_diffusion("250")
    steps = np.asarray(d.timestep_map)
    assert d.num_timesteps == len(steps) == 250
    assert steps[0] == 0 and steps[-1] == 999
    assert np.all(np.diff(steps) > 0)
    assert set(np.diff(steps).tolist()) <= {4, 5}  # stride 999/249 ≈ 4.01, rounded
    assert steps.tolist() == space_timesteps(1000, "250")

    # The kept ᾱ are the training ᾱ; betas are recomputed from them.
    np.testing.assert_allclose(d.alphas_cumprod, ABAR[steps], rtol=1e-12)
    abar_prev = np.append(1.0, ABAR[steps][:-1])
    np.testing.assert_allclose(d.betas, 1 - ABAR[steps] / abar_prev, rtol=1e-10)
    assert d.betas[1] > 3 * BETAS[4]  # a respaced step spans several training steps

    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert create_diffusion("ddim50").timestep_map == list(range(0, 1000, 20))


def test_respaced_model_receives_original_integer_steps():
    d = create_diffusion("10")
    seen = []

    def model_fn(x, t):
        seen.append(t.clone())
        return torch.cat([0.1 * x, torch.zeros_like(x)], dim=1)

    d.p_sample_loop(model_fn, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert all(t.dtype == torch.long for t in seen)
    assert [int(t[0]) for t in seen] == d.timestep_map[::-1] == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]

    seen.clear()
    d.training_losses(model_fn, torch.zeros(3, 1, 2, 2), torch.tensor([0, 5, 9]))
    assert seen[0].tolist() == [0, 555, 999]

    seen.clear()
    d.p_mean_variance(model_fn, torch.zeros(1, 1, 2, 2), torch.tensor([1]))
    assert seen[0].tolist() == [111]


@pytest.mark.parametrize("respacing", ["", "1000"])
def test_full_respacing_reproduces_original_betas(respacing):
    d = create_diffusion(respacing)
    assert d.timestep_map == list(range(1000))
    np.testing.assert_allclose(d.betas, BETAS, rtol=1e-10, atol=0)
    np.testing.assert_allclose(d.alphas_cumprod, ABAR, rtol=1e-12)


# ----------------------------------------------------------------------------- samplers

def _conv_model():
    """A small random conv around ε̂ ≈ x (keeps samples bounded), v = tanh(·) in [−1, 1]."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 6, kernel_size=1)

    def model_fn(x, t):
        h = conv(x)
        return torch.cat([x + 0.1 * h[:, :3], torch.tanh(h[:, 3:])], dim=1)

    return model_fn


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_samplers_are_deterministic_per_seed(loop):
    model_fn = _conv_model()
    sample = getattr(create_diffusion("8"), loop)
    shape = (2, 3, 4, 4)
    a = sample(model_fn, shape, generator=torch.Generator().manual_seed(0))
    b = sample(model_fn, shape, generator=torch.Generator().manual_seed(0))
    c = sample(model_fn, shape, generator=torch.Generator().manual_seed(1))
    assert a.shape == shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)

    # Given the starting noise, DDIM (η = 0) no longer depends on the generator; DDPM still does.
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    d = sample(model_fn, shape, noise=noise, generator=torch.Generator().manual_seed(0))
    e = sample(model_fn, shape, noise=noise, generator=torch.Generator().manual_seed(1))
    assert torch.equal(d, e) == (loop == "ddim_sample_loop")


def test_samplers_with_exact_score_recover_gaussian_data():
    """For data N(0, s²) the optimal ε̂ is known in closed form; 1000-step DDPM (learned-range variance
    with v = 0) and DDIM must then produce samples with standard deviation s."""
    s = 0.5
    abar = torch.as_tensor(ABAR)

    def oracle(x, t):
        a = abar[t].view(-1, 1).to(x.dtype)
        eps = torch.sqrt(1 - a) * x / (a * s * s + 1 - a)
        return torch.cat([eps, torch.zeros_like(x)], dim=1)

    d = create_diffusion("")
    shape = (1, 4000)  # one batch row of many i.i.d. dimensions keeps every step cheap
    for loop in (d.p_sample_loop, d.ddim_sample_loop):
        x = loop(oracle, shape, generator=torch.Generator().manual_seed(0))
        assert abs(x.std().item() - s) < 0.04 * s, (loop.__name__, x.std().item())
        assert abs(x.mean().item()) < 4 * s / math.sqrt(x.numel())


# ----------------------------------------------------------------------------- ODE samplers

@pytest.mark.parametrize("sampler", ["dpm-solver++", "heun", "unipc"])
def test_ode_samplers_with_exact_score_recover_gaussian_data(sampler):
    """Data N(0, s²): the exact ε̂ is sqrt(1 − ᾱ) x_t / (ᾱ s² + 1 − ᾱ), with ᾱ = 1/(1 + σ²) at noise level σ;
    the probability-flow ODE then carries the unit noise to samples of standard deviation s."""
    from diffusion.sampling import noise_level

    s = 0.5

    def oracle(x, t):
        sigma = torch.tensor([noise_level(float(v)) for v in t], dtype=torch.float64).view(-1, 1)
        a = 1.0 / (1.0 + sigma ** 2)
        eps = torch.sqrt(1 - a) * x.double() / (a * s * s + 1 - a)
        return torch.cat([eps, torch.zeros_like(eps)], dim=1).float()

    from diffusion.sampling import ode_sample_loop

    noise = torch.randn((1, 4000), generator=torch.Generator().manual_seed(0))
    x = ode_sample_loop(sampler, oracle, noise, 30)
    assert abs(x.std().item() - s) < 0.04 * s, (sampler, x.std().item())


@pytest.mark.parametrize("sampler", ["dpm-solver++", "heun", "unipc"])
def test_ode_samplers_read_only_the_eps_channels(sampler):
    model = _StubDiT()
    kw = dict(cfg_scale=1.0, num_steps=6, sampler=sampler)
    a = sample_images(model, [1, 2], (1, 2, 2), generator=torch.Generator().manual_seed(0), **kw)
    model.variance = 0.9  # other variance channels, same ε
    b = sample_images(model, [1, 2], (1, 2, 2), generator=torch.Generator().manual_seed(0), **kw)
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_heun_on_the_karras_grid_calls_the_model_twice_per_step_but_the_last():
    model = _StubDiT()
    sample_images(model, [1], (1, 2, 2), cfg_scale=1.0, num_steps=7, sampler="heun",
                  generator=torch.Generator().manual_seed(0))
    ts = [float(c[2][0]) for c in model.calls]
    assert len(ts) == 2 * 7 - 1
    assert ts[0] == pytest.approx(999, abs=0.5) and any(t != round(t) for t in ts)  # fractional steps of σ


def _trained_tiny_model(steps=40):
    """DiT (depth 1, width 32) trained briefly on the digits at 4×4: a learned ODE in a few seconds."""
    import data
    from helpers import tiny_dit

    ds = data.load_dataset("digits", image_size=4)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([int(ds[i][1]) for i in range(len(ds))])
    torch.manual_seed(0)
    model = tiny_dit(depth=1, in_channels=1, input_size=4, num_classes=10)
    d = create_diffusion("")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        t = torch.randint(0, 1000, (32,), generator=g)
        loss = d.training_losses(model, x[idx], t, {"y": y[idx]})["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_dpm_solver_at_few_steps_is_closer_to_the_long_ddim_solution_than_ddim():
    """Same noise: the ODE solvers at 8 steps land nearer the 200-step DDIM image than 8-step DDIM
    (benchmarks/sampler_convergence.py measures the whole table on a larger, longer-trained model)."""
    model = _trained_tiny_model()
    labels = torch.arange(8) % 10

    def run(sampler, n):
        return sample_images(model, labels, (1, 4, 4), cfg_scale=1.0, num_steps=n, sampler=sampler,
                             generator=torch.Generator().manual_seed(3))

    ref = run("ddim", 200)
    err = {s: (run(s, 8) - ref).square().mean().sqrt().item() for s in ("ddim", "dpm-solver++", "unipc", "heun")}
    assert max(err["dpm-solver++"], err["unipc"], err["heun"]) < 0.5 * err["ddim"], err
    assert (run("dpm-solver++", 20) - ref).square().mean().sqrt().item() < err["dpm-solver++"]  # converges


# ----------------------------------------------------------------------------- guidance

class _StubDiT(torch.nn.Module):
    """Stand-in for models.DiT: ε̂ depends on x and the label, the variance channel is constant."""

    num_classes = 5
    in_channels = 1

    def __init__(self, offset=0.0):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.2))
        self.offset, self.variance = offset, 0.0
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(("forward", x.clone(), t.clone(), y.clone(), self.training))
        eps = self.scale * x + 0.05 * y.view(-1, 1, 1, 1).to(x.dtype) + self.offset
        return torch.cat([eps, torch.full_like(x, self.variance)], dim=1)


def _plain_cfg(labels, scale, offset=0.0):
    def guided(x, t):
        yy = labels.view(-1, 1, 1, 1).float()
        cond, uncond = 0.2 * x + 0.05 * yy + offset, 0.2 * x + 0.05 * 5 + offset
        return torch.cat([uncond + scale * (cond - uncond), torch.zeros_like(x)], dim=1)
    return guided


def test_sample_images_with_guidance_runs_both_halves_in_one_doubled_batch():
    model = _StubDiT()
    labels = torch.tensor([1, 3])
    out = sample_images(model, labels, (1, 2, 2), cfg_scale=3.0, num_steps=4, sampler="ddim",
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 2, 2)
    assert len(model.calls) == 4
    _, x, t, y, _ = model.calls[0]
    assert x.shape[0] == 4 and torch.equal(x[:2], x[2:])  # same noise in both halves
    assert y.tolist() == [1, 3, 5, 5]
    assert t.tolist() == [999] * 4  # original step indices

    # Same result as guiding directly on the single batch with the same starting noise.
    z = torch.randn((2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    expected = create_diffusion("4").ddim_sample_loop(_plain_cfg(labels, 3.0), z.shape, noise=z)
    torch.testing.assert_close(out, expected)


def test_guidance_on_a_dit_equals_its_forward_with_cfg_exactly():
    """The guided ε of the sampler is bit for bit the DiT's own forward_with_cfg on the doubled batch."""
    from helpers import tiny_dit

    torch.manual_seed(0)
    model = tiny_dit(in_channels=2, input_size=4, num_classes=5).eval()
    labels = torch.tensor([0, 4, 2])
    out = sample_images(model, labels, (2, 4, 4), cfg_scale=2.5, num_steps=5, sampler="ddim",
                        generator=torch.Generator().manual_seed(1))
    z = torch.randn((3, 2, 4, 4), generator=torch.Generator().manual_seed(1))
    y = torch.cat([labels, torch.full_like(labels, 5)])
    ref = create_diffusion("5").ddim_sample_loop(model.forward_with_cfg, (6, 2, 4, 4), noise=torch.cat([z, z]),
                                                 model_kwargs={"y": y, "cfg_scale": 2.5})
    assert torch.equal(out, ref[:3])


@pytest.mark.parametrize("sampler", ["ddpm", "dpm-solver++"])
def test_guidance_interval_spends_no_unconditional_pass_outside_it(sampler):
    from diffusion.sampling import GuidedDenoiser, noise_level

    model = _StubDiT()
    labels = torch.tensor([1, 3])
    lo, hi = 0.5, 5.0
    den = GuidedDenoiser(model, labels, cfg_scale=2.0, guidance_interval=(lo, hi))
    sample_images(model, labels, (1, 2, 2), cfg_scale=2.0, num_steps=20, sampler=sampler,
                  generator=torch.Generator().manual_seed(0), denoiser=den)
    sigmas = [noise_level(float(c[2][0])) for c in model.calls]
    assert len(model.calls) == 20  # one network call per step
    inside = [lo < s <= hi for s in sigmas]
    assert 0 < sum(inside) < 20
    for (_, x, _, y, _), inn in zip(model.calls, inside):
        assert x.shape[0] == (4 if inn else 2)  # the null-label half only inside
        assert y.tolist() == ([1, 3, 5, 5] if inn else [1, 3])
    assert [n for _, n in den.calls] == [4 if inn else 2 for inn in inside]


@pytest.mark.parametrize("sampler", ["ddpm", "heun"])
def test_guidance_interval_covering_every_step_equals_plain_cfg_exactly(sampler):
    model = _StubDiT()
    kw = dict(cfg_scale=2.0, num_steps=6, sampler=sampler)
    plain = sample_images(model, [1, 3], (1, 2, 2), generator=torch.Generator().manual_seed(0), **kw)
    full = sample_images(model, [1, 3], (1, 2, 2), generator=torch.Generator().manual_seed(0),
                         guidance_interval=(0.0, float("inf")), **kw)
    assert torch.equal(plain, full)
    none = sample_images(model, [1, 3], (1, 2, 2), generator=torch.Generator().manual_seed(0),
                         guidance_interval=(1e3, 1e4), **kw)  # above σ_max: never guided
    cond = sample_images(model, [1, 3], (1, 2, 2), generator=torch.Generator().manual_seed(0),
                         **{**kw, "cfg_scale": 1.0})
    assert torch.equal(none, cond) and not torch.equal(plain, cond)


@pytest.mark.parametrize("sampler", ["ddpm", "unipc"])
def test_autoguidance_with_the_main_model_as_guide_equals_the_conditional_prediction(sampler):
    model = _StubDiT()
    kw = dict(num_steps=5, sampler=sampler)
    guided = sample_images(model, [1, 3], (1, 2, 2), cfg_scale=2.5, guide=model,
                           generator=torch.Generator().manual_seed(0), **kw)
    cond = sample_images(model, [1, 3], (1, 2, 2), cfg_scale=1.0, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(guided, cond)


def test_autoguidance_extrapolates_from_the_guide_only_inside_the_interval():
    from diffusion.sampling import GuidedDenoiser

    main, guide = _StubDiT(), _StubDiT(offset=0.3)
    labels = torch.tensor([2])
    den = GuidedDenoiser(main, labels, cfg_scale=2.0, guide=guide, guidance_interval=(1.0, 10.0))
    out = sample_images(main, labels, (1, 2, 2), cfg_scale=2.0, num_steps=10, sampler="ddim",
                        generator=torch.Generator().manual_seed(0), denoiser=den)
    names = [n for n, _ in den.calls]
    assert 0 < names.count("guide") < 10 and names.count("cond") == 10
    assert all(c[3].tolist() == [2] for c in guide.calls)  # the guide sees the condition, never the null label
    # ε = ε_g + 2 (ε_m − ε_g) = ε_m − 0.3 inside the interval: the same as a main model shifted by −0.3 there
    assert torch.isfinite(out).all()
    x = torch.randn(1, 1, 2, 2)
    t = torch.tensor([500])
    torch.testing.assert_close(den(x, t)[:, :1], main(x, t, labels)[:, :1] - 0.3)


def test_sample_images_without_guidance_runs_the_conditional_model_in_eval_mode():
    model = _StubDiT().train()
    out = sample_images(model, [0, 4, 2], (1, 2, 2), cfg_scale=1.0, num_steps=3, sampler="ddpm",
                        generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 1, 2, 2) and torch.isfinite(out).all()
    assert model.calls and all(c[3].tolist() == [0, 4, 2] for c in model.calls)
    assert not any(c[4] for c in model.calls)  # eval mode while sampling (no class dropout)
    assert model.training  # restored afterwards

    again = sample_images(model, [0, 4, 2], (1, 2, 2), cfg_scale=1.0, num_steps=3,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    one_step = sample_images(model, [0], (1, 2, 2), cfg_scale=1.5, num_steps=1,
                             generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(one_step).all()


def test_ddim_eta_adds_noise_from_the_generator():
    model = _StubDiT()
    kw = dict(cfg_scale=1.0, num_steps=5, sampler="ddim")
    a = sample_images(model, [1], (1, 2, 2), generator=torch.Generator().manual_seed(0), **kw)
    b = sample_images(model, [1], (1, 2, 2), generator=torch.Generator().manual_seed(0), eta=1.0, **kw)
    c = sample_images(model, [1], (1, 2, 2), generator=torch.Generator().manual_seed(0), eta=1.0, **kw)
    assert not torch.equal(a, b) and torch.equal(b, c)


# ----------------------------------------------------------------------------- errors

def test_invalid_arguments_raise_clear_errors():
    model = _StubDiT()
    with pytest.raises(ValueError, match="sampler"):
        sample_images(model, [0], (1, 2, 2), cfg_scale=1.0, sampler="euler")
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        sample_images(model, [0], (1, 2, 2), cfg_scale=float("nan"))
    with pytest.raises(ValueError, match="eta"):
        sample_images(model, [0], (1, 2, 2), cfg_scale=1.0, sampler="ddim", eta=-1.0)
    for bad in ((2.0, 1.0), (float("nan"), 1.0), (-1.0, 1.0)):
        with pytest.raises(ValueError, match="guidance interval"):
            sample_images(model, [0], (1, 2, 2), cfg_scale=2.0, guidance_interval=bad)
    for bad in (0, 1001, -5, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            sample_images(model, [0], (1, 2, 2), cfg_scale=1.0, num_steps=bad)
    with pytest.raises(ValueError, match="cannot take 1200 steps out of a section of 1000"):
        space_timesteps(1000, "1200")
    with pytest.raises(ValueError, match="cannot take exactly 300 steps out of 1000"):
        space_timesteps(1000, "ddim300")  # no integer stride gives exactly 300 steps
    with pytest.raises(ValueError, match="model output"):
        create_diffusion("").training_losses(lambda x, t: x, torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]))
