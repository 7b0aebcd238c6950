"""Tests of the code chapter 17 exports (lib/groundup/iddpm.py)."""

import math

import pytest
import torch
import torch.nn as nn

from conftest import Crash, crashing_progress
from groundup import ddpm as ddpm_module
from groundup.ddpm import GaussianDiffusion, linear_beta_schedule, train_diffusion
from groundup.iddpm import (ImprovedDiffusion, cosine_alpha_bar, cosine_beta_schedule, ddim_sample, ddim_step,
                            discretized_gaussian_log_likelihood, hybrid_loss, nll_bpd, normal_kl, prior_bpd, respace,
                            spaced_timesteps, vlb_terms)
from groundup.unet import UNet, UNetConfig


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread


class StandIn(nn.Module):
    """Deterministic eps (and v) heads: 1x1 convolutions plus a function of t."""

    def __init__(self, channels=3, learned=True):
        super().__init__()
        self.eps = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1) if learned else None

    def forward(self, x, t):
        shift = (t.to(x.dtype) / 1000)[:, None, None, None]
        eps = 0.5 * self.eps(x) + 0.1 * shift
        return eps if self.v is None else torch.cat([eps, torch.tanh(self.v(x) + shift - 0.5)], dim=1)


def _diffusers_float64(T, **kwargs):
    from diffusers import DDPMScheduler
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", **kwargs)
    sched.betas = cosine_beta_schedule(T)
    sched.alphas = 1 - sched.betas
    sched.alphas_cumprod = torch.cumprod(sched.alphas, 0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched


def _images(n, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).double() / 127.5 - 1


@pytest.mark.parametrize("T", [10, 1000, 4000])
def test_cosine_schedule_matches_diffusers(T):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").betas.double()
    ours = cosine_beta_schedule(T)
    assert ours.dtype == torch.float64 and ours.shape == (T,)
    assert (ours - ref).abs().max() < 1e-7
    assert ours[-1] == 0.999 and (ours > 0).all()
    # alpha_bar from the betas is f(t)/f(0) except at the clipped last step
    assert torch.allclose(torch.cumprod(1 - ours, 0)[:-1], cosine_alpha_bar(torch.arange(1, T + 1), T)[:-1],
                          rtol=1e-10, atol=1e-15)


def test_cosine_schedule_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_beta"):
        cosine_beta_schedule(100, max_beta=1.0)
    with pytest.raises(ValueError, match="positive"):
        cosine_beta_schedule(0)


def test_normal_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, l1, l2 = (torch.randn(500, dtype=torch.float64, generator=g) for _ in range(4))
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * l1).exp()),
                                            torch.distributions.Normal(m2, (0.5 * l2).exp()))
    assert (normal_kl(m1, l1, m2, l2) - ref).abs().max() < 1e-12


def test_the_decoder_is_chapter_14s():
    """Chapter 17's decoder L_0 is chapter 14's discretized Gaussian (tested in test_vae.py), not a copy."""
    from groundup import iddpm, vae
    assert iddpm.discretized_gaussian_log_likelihood is vae.discretized_gaussian_log_likelihood


def test_learned_range_step_matches_diffusers():
    T = 1000
    torch.manual_seed(0)
    model = StandIn().double()
    ours = ImprovedDiffusion(cosine_beta_schedule(T), variance_type="learned_range")
    sched = _diffusers_float64(T, variance_type="learned_range")
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in (999, 600, 20, 2, 1, 0):
            tt = torch.full((3,), t)
            a = ours.p_sample(model, x, tt, generator=torch.Generator().manual_seed(t))
            b = sched.step(model(x, tt), t, x, generator=torch.Generator().manual_seed(t)).prev_sample
            assert (a - b).abs().max() < 1e-12, t


@pytest.mark.parametrize("variance_type", ["learned_range", "fixed_small", "fixed_large"])
def test_respaced_trajectory_matches_diffusers_set_timesteps(variance_type):
    T, K = 1000, 7
    torch.manual_seed(0)
    model = StandIn(learned=variance_type == "learned_range").double()
    sched = _diffusers_float64(T, variance_type=variance_type, timestep_spacing="linspace")
    sched.set_timesteps(K)
    short = respace(ImprovedDiffusion(cosine_beta_schedule(T), variance_type=variance_type), spaced_timesteps(T, K))
    assert short.T == K and torch.equal(short.timestep_map.flip(0), sched.timesteps)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a, b = x.clone(), x.clone()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            a = short.p_sample(model, a, torch.full((2,), K - 1 - i), generator=torch.Generator().manual_seed(i))
            b = sched.step(model(b, torch.full((2,), int(t))), t, b, generator=torch.Generator().manual_seed(i)).prev_sample
    assert (a - b).abs().max() < 1e-12


def test_respace_to_all_steps_is_the_identity_and_bad_lists_are_rejected():
    d = ImprovedDiffusion(linear_beta_schedule(200), variance_type="fixed_small")
    same = respace(d, torch.arange(200))
    for name in ("betas", "alpha_bar", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2"):
        assert torch.allclose(getattr(same, name), getattr(d, name), rtol=1e-12, atol=0), name
    short = respace(d, torch.tensor([0, 50, 199]))
    assert torch.allclose(short.alpha_bar, d.alpha_bar[[0, 50, 199]], rtol=1e-12)   # marginals kept
    with pytest.raises(ValueError, match="increasing"):
        respace(d, torch.tensor([5, 3]))
    with pytest.raises(ValueError, match="between 1 and"):
        spaced_timesteps(10, 11)


def test_fixed_small_is_chapter_15_and_output_channels_are_checked():
    betas = linear_beta_schedule(100)
    base, ours = GaussianDiffusion(betas), ImprovedDiffusion(betas, variance_type="fixed_small")
    model = StandIn(learned=False).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([1, 57])
    with torch.no_grad():
        a, b = base.p_mean_variance(model, x, t), ours.p_mean_variance(model, x, t)
    for k in ("mean", "variance", "x0"):
        assert torch.allclose(a[k].expand_as(x), b[k].expand_as(x), rtol=0, atol=1e-15)
    # at t = 0 the posterior variance is 0; ours uses the clipped log-variance there (the decoder needs a width)
    with torch.no_grad():
        a, b = base.p_mean_variance(model, x, torch.tensor([0, 0])), ours.p_mean_variance(model, x, torch.tensor([0, 0]))
    assert torch.allclose(a["mean"], b["mean"], rtol=0, atol=1e-15)
    assert torch.allclose(b["variance"], base.posterior_variance[1].expand_as(x))
    with pytest.raises(ValueError, match="2C"):
        ImprovedDiffusion(betas, variance_type="learned_range").p_mean_variance(model, x, t)
    with pytest.raises(ValueError, match="variance_type"):
        ImprovedDiffusion(betas, variance_type="learned")


def test_vlb_terms_zero_kl_at_the_true_posterior():
    """If the model's mean and variance are the posterior's, every KL term vanishes."""
    d = ImprovedDiffusion(cosine_beta_schedule(50), variance_type="fixed_small")
    x0 = _images(2)
    t = torch.tensor([3, 30])
    noise = torch.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    assert vlb_terms(d, noise, x0, xt, t).abs().max() < 1e-10        # the true eps recovers x0 exactly
    assert (vlb_terms(d, noise + 0.1, x0, xt, t) > 1e-4).all()


def test_prior_term_matches_the_formula():
    d = GaussianDiffusion(cosine_beta_schedule(100))
    x0 = _images(3)
    ab = d.alpha_bar[-1]
    by_hand = 0.5 * (-1 - torch.log(1 - ab) + (1 - ab) + ab * x0 ** 2).flatten(1).mean(1) / math.log(2)
    assert torch.allclose(prior_bpd(d, x0), by_hand, rtol=1e-9)


def test_nll_estimate_is_unbiased_and_exact_sum_has_all_terms():
    torch.manual_seed(0)
    d = ImprovedDiffusion(cosine_beta_schedule(12))
    model = StandIn().double()
    x0 = _images(2)
    exact = nll_bpd(d, model, x0, generator=torch.Generator().manual_seed(0))
    assert exact["terms"].shape == (2, 12)
    assert torch.allclose(exact["bpd"], exact["prior"] + exact["terms"].sum(1))
    exacts = torch.stack([nll_bpd(d, model, x0, generator=torch.Generator().manual_seed(s))["bpd"] for s in range(60)])
    for m in (0, 3):
        ests = torch.stack([nll_bpd(d, model, x0, t_samples=3, exact_first=m,
                                    generator=torch.Generator().manual_seed(100 + s))["bpd"] for s in range(300)])
        se = (ests.var(0) / len(ests) + exacts.var(0) / len(exacts)).sqrt()
        assert ((ests.mean(0) - exacts.mean(0)).abs() < 4 * se).all(), m
    with pytest.raises(ValueError, match="exact_first"):
        nll_bpd(d, model, x0, t_samples=2, exact_first=12)


def test_hybrid_loss_stop_gradient_and_value():
    d = ImprovedDiffusion(cosine_beta_schedule(100))
    model = StandIn()
    x0 = _images(4).float()
    out = hybrid_loss(d, model, x0, generator=torch.Generator().manual_seed(0))
    assert torch.isclose(out["loss"], out["mse"] + 0.001 * 100 * out["vlb"].mean())
    model.zero_grad()
    out["vlb"].mean().backward()
    assert model.eps.weight.grad is None or model.eps.weight.grad.abs().max() == 0
    assert model.v.weight.grad.abs().max() > 0
    # training_loss dispatches: hybrid for learned variance, chapter 15's MSE for a fixed one
    g = torch.Generator().manual_seed(0)
    assert torch.isclose(d.training_loss(model, x0, generator=g), out["loss"].detach())
    fixed = ImprovedDiffusion(linear_beta_schedule(100), variance_type="fixed_small")
    eps_model = StandIn(learned=False)
    a = fixed.training_loss(eps_model, x0, generator=torch.Generator().manual_seed(1))
    b = GaussianDiffusion(linear_beta_schedule(100)).training_loss(eps_model, x0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def _tiny_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=8, channel_mult=(1,), attention_levels=(False,), layers_per_block=1,
                           norm_groups=4, dropout=0.1, out_channels=6, image_size=8, mid_attention=False))


def test_hybrid_training_resumes_exactly(tmp_path, monkeypatch):
    """Chapter 15's train_diffusion (with chapter 16's flips) on the hybrid loss: a run killed mid-way and resumed ends with the weights of
    one that never stopped (the loss draws t and eps only from the step's generator; dropout from the saved RNG)."""
    d = ImprovedDiffusion(cosine_beta_schedule(50))
    images = _images(16).float()
    kw = dict(steps=6, batch_size=4, lr=1e-3, warmup=2, ema_decay=0.9, seed=3, save_every=2, flip=True)

    straight = _tiny_unet()
    torch.manual_seed(11)
    r1 = train_diffusion(straight, d, images, checkpoint=tmp_path / "a.safetensors", **kw)

    resumed = _tiny_unet()
    torch.manual_seed(11)
    with monkeypatch.context() as m:
        m.setattr(ddpm_module, "progress", crashing_progress(at=3))
        with pytest.raises(Crash):
            train_diffusion(resumed, d, images, checkpoint=tmp_path / "b.safetensors", **kw)
    resumed = _tiny_unet()
    r2 = train_diffusion(resumed, d, images, checkpoint=tmp_path / "b.safetensors", **kw)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    for a, b in zip(r1["ema"].model.state_dict().values(), r2["ema"].model.state_dict().values()):
        assert torch.equal(a, b)
    assert [l for _, l in r1["loss"]] == [l for _, l in r2["loss"]]


class OnMPS(torch.Tensor):
    """A CPU tensor that behaves like one on Apple's MPS device in one respect: float64 does not exist there.
    `.cpu()` returns a plain tensor; any operation that would make a float64 "device" tensor raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.cpu,):
            return args[0].as_subclass(torch.Tensor).clone()
        out = super().__torch_function__(func, types, args, kwargs or {})
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, OnMPS) and o.dtype == torch.float64:
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't "
                                "support float64")
        return out


def test_nll_bpd_computes_float64_on_the_cpu_only():
    d = ImprovedDiffusion(cosine_beta_schedule(12))
    torch.manual_seed(0)
    model = StandIn()
    x0 = _images(2).float()
    with pytest.raises(TypeError, match="float64"):
        x0.as_subclass(OnMPS).double()                     # the stand-in device refuses float64
    on_device = nll_bpd(d, model, x0.as_subclass(OnMPS), generator=torch.Generator().manual_seed(0))
    on_cpu = nll_bpd(d, model, x0, generator=torch.Generator().manual_seed(0))
    assert on_device["bpd"].dtype == torch.float64 and torch.equal(on_device["bpd"], on_cpu["bpd"])


def test_fixed_variances_stay_one_number_per_image():
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 5, 40])
    for variance_type in ("fixed_small", "fixed_large"):
        d = ImprovedDiffusion(cosine_beta_schedule(50), variance_type=variance_type)
        out = d.p_from_output(torch.zeros_like(x), x, t)
        assert out["variance"].shape == out["log_variance"].shape == (3, 1, 1, 1), variance_type
    learned = ImprovedDiffusion(cosine_beta_schedule(50)).p_from_output(torch.zeros(3, 6, 8, 8, dtype=x.dtype), x, t)
    assert learned["variance"].shape == x.shape


def _ddim_scheduler(T, kind):
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", prediction_type=kind)
    sched.alphas_cumprod = torch.cumprod(1 - cosine_beta_schedule(T), 0)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_trajectory_matches_diffusers_ddim_scheduler(kind, eta, spacing):
    T, K = 1000, 8
    torch.manual_seed(0)
    model = StandIn(learned=False).double()
    sched = _ddim_scheduler(T, kind)
    sched.register_to_config(timestep_spacing=spacing)
    sched.set_timesteps(K)
    short = respace(ImprovedDiffusion(cosine_beta_schedule(T), variance_type="fixed_small", prediction_type=kind),
                    sched.timesteps.flip(0))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    a, b = x.clone(), x.clone()
    for i, t in enumerate(sched.timesteps):
        a = ddim_step(short, model, a, K - 1 - i, eta=eta, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            out = model(b, torch.full((2,), int(t)))
        b = sched.step(out, t, b, eta=eta, use_clipped_model_output=True,
                       generator=torch.Generator().manual_seed(i)).prev_sample
    assert (a - b).abs().max() < 1e-12
    # the whole loop: ddim_sample from the same x_T, drawing noise from one generator
    g = torch.Generator().manual_seed(9)
    c = ddim_sample(short, model, x.shape, x_T=x.clone(), eta=eta, generator=g, progress_bar=False)
    g, d = torch.Generator().manual_seed(9), x.clone()
    for i in range(K):
        d = ddim_step(short, model, d, K - 1 - i, eta=eta, generator=g)
    assert torch.equal(c, d)


def test_ddim_with_eta_1_is_the_ddpm_step():
    torch.manual_seed(0)
    model = StandIn(learned=False).double()
    for d in (GaussianDiffusion(linear_beta_schedule(100)),
              respace(ImprovedDiffusion(cosine_beta_schedule(100), variance_type="fixed_small"), [0, 9, 40, 99])):
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        for t in range(d.T):
            a = ddim_step(d, model, x, t, eta=1.0, generator=torch.Generator().manual_seed(t))
            b = d.p_sample(model, x, t, generator=torch.Generator().manual_seed(t))
            assert (a - b).abs().max() < 1e-12, t
    # eta = 0 draws nothing: the same x_T gives the same sample for any generator
    z = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    s1, s2 = (ddim_sample(d, model, z.shape, x_T=z, generator=torch.Generator().manual_seed(s), progress_bar=False)
              for s in (0, 1))
    assert torch.equal(s1, s2)


def test_model_kwargs_reach_the_model_in_every_path():
    """Conditioning flows through the hybrid loss, the NLL, DDIM, the respaced ancestral sampler and the loop."""
    seen = []

    class Conditional(StandIn):
        def forward(self, x, t, *, label):
            seen.append(label)
            return super().forward(x, t) * label.view(-1, 1, 1, 1).to(x.dtype)

    torch.manual_seed(0)
    model = Conditional()
    d = ImprovedDiffusion(cosine_beta_schedule(10))
    x0, label = _images(2).float(), torch.tensor([1.0, 2.0])
    kw = {"label": label}
    hybrid_loss(d, model, x0, generator=torch.Generator().manual_seed(0), model_kwargs=kw)
    nll_bpd(d, model, x0, t_samples=2, exact_first=1, generator=torch.Generator().manual_seed(0), model_kwargs=kw)
    short = respace(d, [0, 4, 9])
    short.sample(model, x0.shape, generator=torch.Generator().manual_seed(0), progress_bar=False, model_kwargs=kw)
    ddim_sample(short, model, x0.shape, generator=torch.Generator().manual_seed(0), progress_bar=False,
                model_kwargs=kw)
    assert len(seen) == 1 + 3 + 3 + 3 and all(s is label for s in seen)
    with pytest.raises(TypeError):
        hybrid_loss(d, model, x0, generator=torch.Generator().manual_seed(0))
