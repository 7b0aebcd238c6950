"""Chapter 22's exported code: consistency models (groundup.consistency)."""

import math

import pytest
import torch

from groundup.consistency import (ConsistencyFunction, ConsistencyLoss, EpsToEDM, boundary_scalings,
                                  consistency_sample, ct_schedule, heun_step, inference_sigmas,
                                  karras_sigmas, noise_conditioning)
from groundup.ddpm import EMA, GaussianDiffusion, linear_beta_schedule, train_diffusion
from groundup.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

DIFFUSION = GaussianDiffusion(linear_beta_schedule(100, 1e-3, 0.2))


def eps_net(seed=0, dtype=torch.float64):
    """a chapter-16 UNet small enough for float64 checks on 1 x 8 x 8 images"""
    torch.manual_seed(seed)
    cfg = UNetConfig(in_channels=1, out_channels=1, base_channels=8, channel_mult=(1, 2),
                     attention_levels=(False, True), layers_per_block=1, norm_groups=4, dropout=0.0,
                     image_size=8)
    return UNet(cfg).to(dtype).eval()


def test_boundary_condition_is_exact_and_only_at_eps():
    f = ConsistencyFunction(EpsToEDM(eps_net(), DIFFUSION)).double()
    x = 3 * torch.randn(4, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(f(x, 0.002), x)
        assert torch.equal(f.float()(x.float(), 0.002), x.float())
        f.double()
        assert (f(x, 0.01) - x).abs().max() > 1e-6          # elsewhere the network has its say
    c_skip, c_out = boundary_scalings(torch.tensor([0.002, 80.0], dtype=torch.float64))
    assert c_skip[0] == 1 and c_out[0] == 0 and c_skip[1] < 1e-4


def test_sigma_space_teacher_is_chapter_15s_x0_hat():
    net = eps_net()
    edm = EpsToEDM(net, DIFFUSION)
    t = torch.tensor([0, 3, 42, 99])
    sigma = ((1 - DIFFUSION.alpha_bar) / DIFFUSION.alpha_bar).sqrt()[t]
    s = sigma.view(-1, 1, 1, 1)
    x_sigma = torch.randn(4, 1, 8, 8, dtype=torch.float64) * (1 + s)
    x_t = x_sigma / (1 + s ** 2).sqrt()
    with torch.no_grad():
        assert (edm.timestep(sigma) - t).abs().max() <= 1e-12
        ref = DIFFUSION.predict_x0_from_eps(x_t, t, net(x_t, t))
        assert (edm.denoise(x_sigma, sigma) - ref).abs().max() <= 1e-12
        c_in = 1 / (s ** 2 + 0.25).sqrt()
        c_skip, c_out = 0.25 / (s ** 2 + 0.25), 0.5 * s / (s ** 2 + 0.25).sqrt()
        via_f = c_skip * x_sigma + c_out * edm(c_in * x_sigma, noise_conditioning(sigma))
        assert (via_f - ref).abs().max() <= 1e-11


def test_heun_step_is_third_order_on_a_gaussian():
    def denoiser(x, sigma, c=0.5):
        s = sigma.reshape(-1, 1).to(x.dtype)
        return c ** 2 / (c ** 2 + s ** 2) * x
    x = torch.randn(8, 3, dtype=torch.float64)
    err = {}
    for h in (0.25, 0.125):
        exact = x * math.sqrt((0.25 + (2 - h) ** 2) / 4.25)
        step = heun_step(denoiser, x, torch.tensor(2.0, dtype=torch.float64),
                         torch.tensor(2.0 - h, dtype=torch.float64))
        err[h] = (step - exact).abs().max().item()
    assert 6 < err[0.25] / err[0.125] < 12


def test_sigmas_timesteps_scalings_and_multistep_equal_diffusers():
    from diffusers import CMStochasticIterativeScheduler
    N = 40
    sched = CMStochasticIterativeScheduler(num_train_timesteps=N)
    ours = karras_sigmas(N).flip(0)
    assert ((ours - sched.sigmas) / sched.sigmas).abs().max() <= 1e-12
    assert (noise_conditioning(ours) - sched.timesteps).abs().max() <= 1e-10
    ref = sched.get_scalings_for_boundary_condition(sched.sigmas)
    for a, b in zip(boundary_scalings(sched.sigmas), ref):
        assert (a - b).abs().max() <= 1e-15
    edm = EpsToEDM(eps_net(1), DIFFUSION)
    f = ConsistencyFunction(edm).double()
    for steps in (1, 3):
        sched.set_timesteps(steps)
        theirs = sched.sigmas[:-1].double()                 # float32 in diffusers
        assert ((inference_sigmas(steps, N) - theirs) / theirs).abs().max() <= 1e-6
        eps_level = torch.tensor([0.002], dtype=torch.float64)
        sched.sigmas = torch.cat([inference_sigmas(steps, N), eps_level])   # float64 on both sides
        gen = torch.Generator().manual_seed(steps)
        x = torch.randn(2, 1, 8, 8, generator=gen, dtype=torch.float64) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                out = edm(sched.scale_model_input(x, t), t.reshape(1).expand(2))
                x = sched.step(out, t, x, generator=gen).prev_sample
            ours = consistency_sample(f, (2, 1, 8, 8), sigmas=inference_sigmas(steps, N),
                                      generator=torch.Generator().manual_seed(steps),
                                      dtype=torch.float64)
        assert (ours - x).abs().max() <= 1e-12


def test_ct_schedule_and_cd_with_an_oracle_is_ct():
    assert abs(ct_schedule(0, 100)[1] - 0.9) < 1e-12
    assert ct_schedule(100, 100)[0] == 151 and ct_schedule(0, 100)[0] == 2
    x0 = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    f = ConsistencyFunction(EpsToEDM(eps_net(), DIFFUSION)).double()
    target = EMA(f, decay=0.95)

    class Oracle(torch.nn.Module):
        def denoise(self, x, sigma):
            return x0
    cd = ConsistencyLoss(target, teacher=Oracle(), N=2)
    ct = ConsistencyLoss(target, total_steps=10 ** 9)            # N(k) = 2 for k << K
    cd = cd.training_loss(f, x0, torch.Generator().manual_seed(0))
    ct = ct.training_loss(f, x0, torch.Generator().manual_seed(0))
    assert abs(cd.item() - ct.item()) <= 1e-12 * max(1.0, ct.item())
    with pytest.raises(ValueError):
        ConsistencyLoss(target)                              # CT needs its K


def test_consistency_training_loss_decreases_on_a_tiny_problem():
    torch.manual_seed(0)
    images = torch.zeros(64, 1, 8, 8)
    images[:, :, 2:6, 2:6] = torch.rand(64, 1, 1, 1) * 2 - 1    # squares of random brightness
    f = ConsistencyFunction(EpsToEDM(eps_net(dtype=torch.float32), DIFFUSION))
    target = EMA(f, decay=0.9)
    loss = ConsistencyLoss(target, total_steps=40, s1=10)

    def held_out():
        with torch.no_grad():
            return loss.training_loss(f, images[:32], torch.Generator().manual_seed(123)).item()
    before = held_out()
    train_diffusion(f, loss, images, ema=target, steps=40, batch_size=16, lr=2e-3, seed=0)
    assert target.num_updates == 40 and target.decay > 0.9     # eq. (12) moved the target's decay
    assert held_out() < 0.5 * before
