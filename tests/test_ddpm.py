"""Unit tests of groundup.ddpm (chapter 15): the schedule, q_sample, the posterior, the sampler step
against diffusers' DDPMScheduler, the training loss, the EMA and the exact resume of train_diffusion."""

import math

import pytest
import torch
import torch.nn as nn
from conftest import Crash, crashing_progress
from diffusers import DDPMScheduler

from groundup.ddpm import (EMA, GaussianDiffusion, TinyUNet, extract, image_grid, linear_beta_schedule,
                           sinusoidal_embedding, train_diffusion)


class Fixed(nn.Module):
    """An eps-'network' that returns a fixed tensor, so the sampler is tested alone."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x, t):
        return self.eps


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(linear_beta_schedule(1000))


def reference(diffusion=None, **kw):
    """diffusers' DDPM scheduler in Ho et al.'s setting; with `diffusion`, its alpha_bar replaced by our float64 one."""
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                        variance_type=kw.pop("variance_type", "fixed_small"), clip_sample=kw.pop("clip_sample", True))
    if diffusion is not None:
        ref.alphas_cumprod = diffusion.alpha_bar.clone()
        ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


def test_extract_shapes_and_errors():
    a = torch.arange(5.0, dtype=torch.float64)
    out = extract(a, torch.tensor([4, 0, 2]), (3, 2, 7, 7))
    assert out.shape == (3, 1, 1, 1) and out.flatten().tolist() == [4.0, 0.0, 2.0]
    assert extract(a, torch.tensor(3), (2, 5)).shape == (2, 1)          # a scalar t is broadcast over the batch
    with pytest.raises(IndexError, match="0..4"):
        extract(a, torch.tensor([5]), (1, 1))
    with pytest.raises(TypeError, match="integers"):
        extract(a, torch.tensor([1.0]), (1, 1))


def test_schedule_matches_diffusers(diffusion):
    ref = reference()
    betas = linear_beta_schedule(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert ((ref.betas.double() - betas) / betas).abs().max() < 2e-7
    assert (ref.alphas_cumprod.double() - diffusion.alpha_bar).abs().max() < 1e-6
    assert diffusion.alpha_bar_prev[0] == 1 and torch.equal(diffusion.alpha_bar_prev[1:], diffusion.alpha_bar[:-1])
    with pytest.raises(ValueError, match="beta_start"):
        linear_beta_schedule(10, 0.5, 0.1)
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1, 1.5]))


def test_posterior_variance_matches_diffusers_fixed_small(diffusion):
    ref64 = reference(diffusion)
    ours = diffusion.posterior_variance
    theirs = torch.stack([ref64._get_variance(t) for t in range(1, 1000)])
    assert (theirs - ours[1:]).abs().max() < 1e-14
    assert ours[0] == 0
    assert torch.allclose(diffusion.posterior_log_variance_clipped[1:], ours[1:].log())
    assert diffusion.posterior_log_variance_clipped[0] == diffusion.posterior_log_variance_clipped[1]


def test_q_sample_matches_add_noise(diffusion):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 28, 28, generator=g) * 2 - 1
    noise = torch.randn(8, 1, 28, 28, generator=g)
    t = torch.tensor([0, 1, 2, 50, 400, 998, 999, 500])
    assert (diffusion.q_sample(x0, t, noise) - reference().add_noise(x0, noise, t)).abs().max() < 1e-5
    x0d, nd = x0.double(), noise.double()
    assert (diffusion.q_sample(x0d, t, nd) - reference(diffusion).add_noise(x0d, nd, t)).abs().max() < 1e-12
    assert diffusion.q_sample(x0, t, noise).dtype == torch.float32


def test_posterior_equals_gaussian_conditioning(diffusion):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    xt = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 7, 300, 999])
    mean, var, _ = diffusion.q_posterior(x0, xt, t)
    ab, abp = diffusion.alpha_bar[t].view(-1, 1, 1, 1), diffusion.alpha_bar_prev[t].view(-1, 1, 1, 1)
    cov = diffusion.alphas[t].sqrt().view(-1, 1, 1, 1) * (1 - abp)
    assert (mean - (abp.sqrt() * x0 + cov / (1 - ab) * (xt - ab.sqrt() * x0))).abs().max() < 1e-12
    assert (var - (1 - abp - cov**2 / (1 - ab))).abs().max() < 1e-14


def test_predict_x0_inverts_q_sample(diffusion):
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    assert (diffusion.predict_x0_from_eps(diffusion.q_sample(x0, t, eps), t, eps) - x0).abs().max() < 1e-9


@pytest.mark.parametrize("clip", [True, False])
def test_p_sample_matches_diffusers_step(diffusion, clip):
    g = torch.Generator().manual_seed(3)
    xt = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = 1.5 * torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    ref64, ref32 = reference(diffusion, clip_sample=clip), reference(clip_sample=clip)
    for t in (999, 600, 100, 10, 2, 1, 0):
        mine = diffusion.p_sample(Fixed(eps), xt, t, generator=torch.Generator().manual_seed(t), clip_x0=clip)
        theirs = ref64.step(eps, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
        assert (mine - theirs).abs().max() < 1e-10, t
        mine32 = diffusion.p_sample(Fixed(eps.float()), xt.float(), t, generator=torch.Generator().manual_seed(t),
                                    clip_x0=clip)
        theirs32 = ref32.step(eps.float(), t, xt.float(), generator=torch.Generator().manual_seed(t)).prev_sample
        assert (mine32 - theirs32).abs().max() < (5e-4 if t <= 10 else 2e-5), t   # diffusers recomputes beta_t in float32


def test_wrong_variance_is_caught(diffusion):
    """sigma_t^2 = beta_t is diffusers' fixed_large, not fixed_small: the comparison must notice."""
    large = GaussianDiffusion(linear_beta_schedule(1000))
    large.posterior_variance = large.betas.clone()
    g = torch.Generator().manual_seed(4)
    xt = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    mine = large.p_sample(Fixed(eps), xt, 500, generator=torch.Generator().manual_seed(0))
    small = reference(diffusion).step(eps, 500, xt, generator=torch.Generator().manual_seed(0)).prev_sample
    fixed_large = reference(diffusion, variance_type="fixed_large").step(
        eps, 500, xt, generator=torch.Generator().manual_seed(0)).prev_sample
    assert (mine - small).abs().max() > 1e-4
    assert (mine - fixed_large).abs().max() < 1e-10


def test_p_mean_variance_unclipped_is_algorithm_2_line_4(diffusion):
    g = torch.Generator().manual_seed(5)
    xt = torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([37, 37])
    out = diffusion.p_mean_variance(Fixed(eps), xt, t, clip_x0=False)
    line4 = (xt - diffusion.betas[37] / diffusion.sqrt_one_minus_alpha_bar[37] * eps) / diffusion.alphas[37].sqrt()
    assert (out["mean"] - line4).abs().max() < 1e-12
    assert set(out) == {"mean", "variance", "log_variance", "x0", "eps"}
    assert diffusion.p_mean_variance(Fixed(10 * eps), xt, t)["x0"].abs().max() <= 1


def test_last_step_adds_no_noise(diffusion):
    xt = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    a = diffusion.p_sample(Fixed(eps), xt, 0, generator=torch.Generator().manual_seed(0))
    b = diffusion.p_sample(Fixed(eps), xt, 0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    # mixed batch: only the t = 0 entries are noise-free
    t = torch.tensor([0, 5])
    a = diffusion.p_sample(Fixed(eps), xt, t, generator=torch.Generator().manual_seed(0))
    b = diffusion.p_sample(Fixed(eps), xt, t, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


def test_sample_runs_algorithm_2_and_returns_the_trajectory():
    small = GaussianDiffusion(linear_beta_schedule(20, 5e-3, 0.5))
    calls = []

    def model(x, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    x, traj = small.sample(model, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                           return_trajectory_every=5, progress_bar=False)
    assert calls == list(range(19, -1, -1))                        # t = T-1 .. 0 in code, T .. 1 in the paper
    assert [s for s, _ in traj] == [20, 15, 10, 5, 0] and torch.equal(traj[-1][1], x)
    assert x.shape == (3, 1, 4, 4) and x.abs().max() <= 1          # the last step returns the clipped x0_hat
    again = small.sample(model, (3, 1, 4, 4), generator=torch.Generator().manual_seed(0), progress_bar=False)
    assert torch.equal(again, x)


def test_training_loss_is_eq_14(diffusion):
    g = torch.Generator().manual_seed(6)
    x0 = torch.rand(4, 1, 6, 6, generator=g) * 2 - 1
    t, noise = torch.tensor([0, 3, 500, 999]), torch.randn(4, 1, 6, 6, generator=g)
    # an oracle that knows eps has zero loss; predicting zero scores E||eps||^2 per pixel
    oracle = lambda xt, tt: (xt - diffusion.sqrt_alpha_bar[tt].view(-1, 1, 1, 1).float() * x0) / \
        diffusion.sqrt_one_minus_alpha_bar[tt].view(-1, 1, 1, 1).float()
    assert diffusion.training_loss(oracle, x0, t=t, noise=noise) < 1e-8
    zero = diffusion.training_loss(lambda xt, tt: torch.zeros_like(xt), x0, t=t, noise=noise)
    assert torch.isclose(zero, noise.pow(2).mean())
    l1 = diffusion.training_loss(lambda xt, tt: xt, x0, generator=torch.Generator().manual_seed(0))
    l2 = diffusion.training_loss(lambda xt, tt: xt, x0, generator=torch.Generator().manual_seed(0))
    assert l1 == l2


def test_sinusoidal_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0, 3, 250, 999])
    assert torch.allclose(sinusoidal_embedding(t, 64), get_timestep_embedding(t, 64, flip_sin_to_cos=False,
                                                                             downscale_freq_shift=0), atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(t, 7)


def test_tiny_unet_shapes_and_time_dependence():
    torch.manual_seed(0)
    net = TinyUNet(8)
    x = torch.randn(2, 1, 28, 28)
    y0, y1 = net(x, torch.tensor([0, 0])), net(x, torch.tensor([90, 90]))
    assert y0.shape == x.shape and not torch.allclose(y0, y1)
    with pytest.raises(ValueError, match="28x28"):
        net(torch.randn(1, 1, 32, 32), torch.tensor([0]))


def test_ema_formula_and_state_round_trip():
    lin = nn.Linear(2, 2)
    ema = EMA(lin, decay=0.8)
    p0 = [p.detach().clone() for p in lin.parameters()]
    with torch.no_grad():
        for p in lin.parameters():
            p.mul_(-2)
    for _ in range(3):
        ema.update(lin)
    for a, p, e in zip(p0, lin.parameters(), ema.model.parameters()):
        assert torch.allclose(e, 0.8**3 * a + (1 - 0.8**3) * p)
    other = EMA(nn.Linear(2, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.8 and other.num_updates == 3
    target = nn.Linear(2, 2)
    other.copy_to(target)
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), ema.model.parameters()))
    warm = EMA(lin, decay=0.999, warmup=True)
    assert math.isclose(warm.current_decay(), 0.1)
    with pytest.raises(ValueError):
        EMA(lin, decay=1.0)


def test_image_grid_shape():
    grid = image_grid(torch.zeros(5, 1, 28, 28), nrow=3, pad=2)
    assert grid.shape == (2 * 30 + 2, 3 * 30 + 2)
    assert grid[5, 5] == 0.5


def test_train_diffusion_resumes_exactly(tmp_path, monkeypatch):
    import groundup.ddpm as ddpm

    small = GaussianDiffusion(linear_beta_schedule(30, 3e-3, 0.5))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 28, 28, generator=g) * 2 - 1
    kw = dict(steps=10, batch_size=8, lr=1e-3, seed=2, warmup=3, save_every=3)

    torch.manual_seed(0)
    straight = TinyUNet(8)
    straight_ema = EMA(straight, 0.9, warmup=True)
    h1 = train_diffusion(straight, straight_ema, small, images, **kw)

    ckpt = tmp_path / "ddpm.safetensors"
    monkeypatch.setattr(ddpm, "progress", crashing_progress(7))
    torch.manual_seed(0)
    crashed = TinyUNet(8)
    with pytest.raises(Crash):
        train_diffusion(crashed, EMA(crashed, 0.9, warmup=True), small, images, **kw, checkpoint=ckpt)
    monkeypatch.undo()
    torch.manual_seed(123)
    resumed = TinyUNet(8)
    resumed_ema = EMA(resumed, 0.9, warmup=True)
    h2 = train_diffusion(resumed, resumed_ema, small, images, **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight_ema.model.parameters(), resumed_ema.model.parameters()):
        assert torch.equal(a, b)
    assert h1["loss"] == h2["loss"] and len(h2["loss"]) == 10
    assert resumed_ema.num_updates == 10


def test_train_diffusion_rejects_unscaled_images():
    small = GaussianDiffusion(linear_beta_schedule(10, 1e-2, 0.5))
    net = TinyUNet(8)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train_diffusion(net, EMA(net), small, torch.rand(8, 1, 28, 28) * 255, steps=1, batch_size=4, lr=1e-3, seed=0)
