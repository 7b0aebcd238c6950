"""Unit tests of groundup.ddpm (chapter 15): the schedule, q_sample, the posterior, the sampler step
against diffusers' DDPMScheduler (each prediction type), the training loss, conditioning through
model_kwargs, data outside [-1, 1], the EMA and the exact resume of train_diffusion."""

import math

import pytest
import torch
import torch.nn as nn
from conftest import Crash, crashing_progress
from diffusers import DDPMScheduler

from groundup.ddpm import (EMA, GaussianDiffusion, TinyUNet, extract, image_grid, linear_beta_schedule,
                           sinusoidal_embedding, train_diffusion)
from groundup.runtime import batch_indices

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread


class Fixed(nn.Module):
    """An eps-'network' that returns a fixed tensor, so the sampler is tested alone."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x, t, **cond):
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


def test_resblock_time_projection_sees_silu_of_the_embedding():
    """Ho et al.'s residual block adds dense(nonlinearity(temb)): the projection's input is SiLU(e(t))."""
    torch.manual_seed(0)
    net = TinyUNet(8)
    seen = []
    hooks = [m.time.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
             for m in (net.down1, net.mid1, net.up1)]
    t = torch.tensor([0, 7, 99])
    net(torch.randn(3, 1, 28, 28), t)
    for h in hooks:
        h.remove()
    temb = net.time_mlp(sinusoidal_embedding(t, net.channels))
    assert len(seen) == 3 and all(torch.allclose(x, torch.nn.functional.silu(temb)) for x in seen)


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
    h1 = train_diffusion(straight, small, images, ema=straight_ema, **kw)

    ckpt = tmp_path / "ddpm.safetensors"
    monkeypatch.setattr(ddpm, "progress", crashing_progress(7))
    torch.manual_seed(0)
    crashed = TinyUNet(8)
    with pytest.raises(Crash):
        train_diffusion(crashed, small, images, ema=EMA(crashed, 0.9, warmup=True), **kw, checkpoint=ckpt)
    monkeypatch.undo()
    torch.manual_seed(123)
    resumed = TinyUNet(8)
    resumed_ema = EMA(resumed, 0.9, warmup=True)
    h2 = train_diffusion(resumed, small, images, ema=resumed_ema, **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight_ema.model.parameters(), resumed_ema.model.parameters()):
        assert torch.equal(a, b)
    assert h1["loss"] == h2["loss"] and len(h2["loss"]) == 10
    assert resumed_ema.num_updates == 10


def test_extract_makes_no_host_sync_off_the_cpu():
    """On a GPU, int(t.min()) reads back from the device: a host synchronization per call. The meta device
    cannot be read back at all, so extract on it fails if it tries."""
    a = torch.arange(10.0, dtype=torch.float64)
    out = extract(a.to("meta"), torch.tensor([3, 7], device="meta"), (2, 1, 4, 4))
    assert out.shape == (2, 1, 1, 1) and out.device.type == "meta"


def test_ema_foreach_update_equals_the_taught_loop():
    torch.manual_seed(0)
    net, other = TinyUNet(8), TinyUNet(8)
    net.register_buffer("counter", torch.tensor([3.0]))
    other.register_buffer("counter", torch.tensor([5.0]))
    ema = EMA(other, decay=0.9, warmup=True)
    reference = [p.detach().clone() for p in ema.model.parameters()]
    for _ in range(3):
        d = ema.current_decay()
        ema.update(net)
        for i, p in enumerate(net.parameters()):          # the loop of chapter 15's text
            reference[i] = d * reference[i] + (1 - d) * p.detach()
    for e, r in zip(ema.model.parameters(), reference):
        assert torch.allclose(e, r, rtol=1e-6, atol=1e-7)
    assert ema.model.counter.item() == 3.0 and ema.num_updates == 3
    with pytest.raises(ValueError, match="shadow"):
        ema.update(nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [1.0, None])
def test_prediction_types_match_diffusers_and_each_other(diffusion, kind, clip):
    g = torch.Generator().manual_seed(8)
    x0 = torch.rand(3, 1, 6, 6, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 1, 6, 6, generator=g, dtype=torch.float64)
    for t in (999, 400, 30, 1, 0):
        tt = torch.full((3,), t)
        xt = diffusion.q_sample(x0, tt, noise)
        target = diffusion.training_target(x0, noise, tt, kind)
        out = diffusion.p_from_output(target, xt, tt, clip_x0=None, prediction_type=kind)
        assert (out["x0"] - x0).abs().max() < 1e-9 and (out["eps"] - noise).abs().max() < 1e-7
        # the training loss of a perfect network is zero, for every type
        assert diffusion.training_loss(Fixed(target), x0, t=tt, noise=noise, prediction_type=kind) < 1e-18
        pred = target + 0.3 * torch.randn(target.shape, generator=g, dtype=torch.float64)
        ref = reference(diffusion, clip_sample=clip is not None)
        ref.config.prediction_type = kind
        theirs = ref.step(pred, t, xt, generator=torch.Generator().manual_seed(t)).prev_sample
        mine = diffusion.p_sample(Fixed(pred), xt, t, generator=torch.Generator().manual_seed(t), clip_x0=clip,
                                  prediction_type=kind)
        assert (mine - theirs).abs().max() < 1e-10, (kind, t)
    assert GaussianDiffusion(linear_beta_schedule(10), prediction_type=kind).prediction_type == kind
    with pytest.raises(ValueError, match="prediction_type"):
        GaussianDiffusion(linear_beta_schedule(10), prediction_type="x0")


def test_sample_from_a_given_x_T_and_with_model_kwargs():
    small = GaussianDiffusion(linear_beta_schedule(15, 5e-3, 0.5))
    seen = []

    def model(x, t, *, label, scale=1.0):
        seen.append(label)
        return scale * torch.tanh(x) * label.view(-1, 1, 1, 1)

    labels = torch.tensor([0.5, -1.0])
    kw = dict(model_kwargs={"label": labels, "scale": 2.0}, progress_bar=False)
    g = torch.Generator().manual_seed(0)
    z = torch.randn((2, 1, 4, 4), generator=g)
    a = small.sample(model, (2, 1, 4, 4), x_T=z, generator=g, **kw)
    b = small.sample(model, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b)                              # x_T drawn by sample() first = x_T given
    assert len(seen) == 30 and all(s is labels for s in seen)
    with pytest.raises(ValueError, match="x_T"):
        small.sample(model, (3, 1, 4, 4), x_T=z, **kw)
    with pytest.raises(TypeError):
        small.sample(model, (2, 1, 4, 4), progress_bar=False)   # the model needs its label
    loss = small.training_loss(model, z, generator=torch.Generator().manual_seed(1),
                               model_kwargs={"label": labels})
    assert torch.isfinite(loss)


def test_clip_x0_is_a_bound_or_none():
    """Data outside [-1, 1] (latents) must sample: clipping is an argument, not a fixed clamp."""
    small = GaussianDiffusion(linear_beta_schedule(10, 1e-2, 0.5))
    z = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = Fixed(-3 * torch.ones(2, 1, 4, 4))

    def run(clip):
        return small.sample(eps, z.shape, x_T=z, clip_x0=clip, generator=torch.Generator().manual_seed(1),
                            progress_bar=False)

    free, at_3, default = run(None), run(3.0), run(1.0)
    assert free.max() > 3 and at_3.abs().max() <= 3 and at_3.max() > 1 and default.abs().max() <= 1
    assert torch.equal(default, run(True)) and torch.equal(free, run(False))
    with pytest.raises(ValueError, match="clip_x0"):
        run(-1.0)


def test_train_diffusion_takes_latents_and_conditioning():
    """Data far outside [-1, 1] trains; per-example model_kwargs reach the model with the batch's rows."""
    small = GaussianDiffusion(linear_beta_schedule(10, 1e-2, 0.5))
    latents = 4 * torch.randn(24, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    class Conditional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.embed = nn.Embedding(24, 2)

        def forward(self, x, t, index):
            seen.append(index.clone())
            return self.conv(x) + self.embed(index)[:, :, None, None]

    torch.manual_seed(0)
    run = train_diffusion(Conditional(), small, latents, steps=7, batch_size=6, lr=1e-2, seed=4,
                          model_kwargs={"index": torch.arange(24)})
    assert len(run["loss"]) == 7 and all(math.isfinite(v) for _, v in run["loss"])
    for step, index in enumerate(seen):
        assert torch.equal(index, batch_indices(24, 6, step, 4)), step
    with pytest.raises(ValueError, match="one row per image"):
        train_diffusion(Conditional(), small, latents, steps=1, batch_size=6, lr=1e-2,
                        model_kwargs={"index": torch.arange(5)})
