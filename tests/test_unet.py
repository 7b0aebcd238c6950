"""Tests of groundup.unet (chapter 16): the timestep embedding, the UNet against diffusers' UNet2DModel, and
the exactly resumable DDPM training loop."""

import math

import pytest
import torch
from conftest import Crash, crashing_progress

from groundup.ddpm import GaussianDiffusion, linear_beta_schedule
from groundup.unet import (UNet, UNetConfig, diffusers_unet_kwargs, from_diffusers_unet, sample_images,
                           timestep_embedding, to_diffusers_unet, train_ddpm)

TINY = UNetConfig(base_channels=8, channel_mult=(1, 2), attention_levels=(False, True), layers_per_block=1,
                  norm_groups=4, image_size=8)


def randomize_(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p[0].numel() ** -0.5 if p.dim() > 1 else 0.3
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)
    return model


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("dim", [16, 17, 64])
def test_timestep_embedding_matches_diffusers(flip, shift, dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.cat([torch.arange(0, 1000, 111), torch.tensor([999.0, 0.5, 12.25])])
    ours = timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    ref = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert ours.shape == (len(t), dim)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_timestep_embedding_values_and_errors():
    e = timestep_embedding(torch.tensor([2]), 4, flip_sin_to_cos=False, downscale_freq_shift=0)
    # h = 2: omega = 1, 10000^(-1/2) = 0.01
    assert torch.allclose(e[0], torch.tensor([math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]))
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.zeros(2, 2), 8)
    with pytest.raises(ValueError, match="too small"):
        timestep_embedding(torch.zeros(2), 2, downscale_freq_shift=1)


def test_config_errors():
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mult=(1, 2), attention_levels=(True,))
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(base_channels=24, norm_groups=32)
    with pytest.raises(ValueError, match="multiples"):
        UNet(TINY)(torch.randn(1, 3, 7, 7), 0)


@pytest.mark.parametrize("cfg", [
    UNetConfig(base_channels=128),                         # Ho et al.'s CIFAR-10 network: 35.7M
    UNetConfig(base_channels=32, channel_mult=(1, 2, 3), attention_levels=(True, False, True), layers_per_block=3,
               norm_groups=16, attention_head_dim=16, out_channels=6, mid_attention=False),
])
def test_parameter_count_equals_unet2dmodel(cfg):
    from diffusers import UNet2DModel

    with torch.device("meta"):
        ours, ref = UNet(cfg), UNet2DModel(**diffusers_unet_kwargs(cfg))
    assert ours.num_params() == ref.num_parameters()
    assert {k.replace(".to_out.", ".to_out.0.") for k in ours.state_dict()} == set(ref.state_dict())
    if cfg.base_channels == 128:
        assert ours.num_params() == 35_746_307


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("conventions", [
    {},
    dict(flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, norm_eps=1e-5, attention_head_dim=8),
])
def test_outputs_match_unet2dmodel_with_ported_weights(dtype, tol, conventions):
    cfg = UNetConfig(**{**TINY.__dict__, "base_channels": 16, "norm_groups": 8, **conventions})
    ours = randomize_(UNet(cfg)).to(dtype).eval()
    ref = to_diffusers_unet(ours)
    x = torch.randn(2, 3, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 990])
    with torch.no_grad():
        a, b = ours(x, t), ref(x, t).sample
    assert (a - b).abs().max() / b.abs().max() < tol
    back = from_diffusers_unet(ref)
    with torch.no_grad():
        assert torch.equal(back(x, t), a)


def test_wrong_skip_order_is_detected():
    cfg = UNetConfig(**{**TINY.__dict__, "base_channels": 16, "norm_groups": 8, "layers_per_block": 2})
    ours = randomize_(UNet(cfg)).double().eval()          # two skips of equal width on top of the stack
    ref = to_diffusers_unet(ours)
    block = ours.up_blocks[0]
    original = block.forward

    def swapped(x, skips, temb):
        skips[-1], skips[-2] = skips[-2], skips[-1]
        return original(x, skips, temb)

    block.forward = swapped
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert (ours(x, torch.tensor([1, 2])) - ref(x, torch.tensor([1, 2])).sample).abs().max() > 1e-6


def test_shapes_time_dependence_and_zero_init():
    model = UNet(TINY)
    x = torch.randn(3, 3, 8, 8)
    assert model(x, torch.tensor([0, 5, 9])).shape == (3, 3, 8, 8)
    assert model(x, 7).shape == (3, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        assert (model(x, 0) - model(x, 500)).abs().max() > 1e-4          # t matters
        model.zero_init_residuals_()
        assert model(x, 0).abs().max() == 0                              # eps_theta = 0 at initialization


def _data(n=24):
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_train_ddpm_learns_and_samples():
    torch.manual_seed(0)
    model = UNet(TINY).zero_init_residuals_()
    diffusion = GaussianDiffusion(linear_beta_schedule(20))
    run = train_ddpm(model, diffusion, _data(), steps=30, batch_size=8, lr=3e-3, ema_decay=0.9, seed=0)
    losses = [v for _, v in run["loss"]]
    assert len(losses) == 30 and losses[0] == pytest.approx(1.0, abs=0.3)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    imgs = sample_images(diffusion, run["ema"].model, 5, batch_size=3, device="cpu", image_shape=(3, 8, 8),
                         progress_bar=False)
    assert imgs.shape == (5, 3, 8, 8) and imgs.min() >= 0 and imgs.max() <= 1
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        train_ddpm(model, diffusion, _data() * 3, steps=1, batch_size=8)


def test_train_ddpm_resumes_exactly(tmp_path, monkeypatch):
    """Killed after its step-6 checkpoint and resumed: the same weights, EMA weights and losses as a run that
    never stopped (dropout, flips, timesteps and noise included)."""
    import groundup.unet as unet

    cfg = UNetConfig(**{**TINY.__dict__, "dropout": 0.3})
    diffusion = GaussianDiffusion(linear_beta_schedule(20))
    kw = dict(steps=10, batch_size=8, lr=3e-3, warmup=3, ema_decay=0.9, ema_warmup=True, seed=2, save_every=3)

    torch.manual_seed(0)
    straight = UNet(cfg)
    r1 = train_ddpm(straight, diffusion, _data(), **kw)

    ckpt = tmp_path / "ddpm.safetensors"
    monkeypatch.setattr(unet, "progress", crashing_progress(8))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_ddpm(UNet(cfg), diffusion, _data(), **kw, checkpoint=ckpt)
    monkeypatch.undo()
    torch.manual_seed(123)                     # different init and RNG: everything must come from the checkpoint
    resumed = UNet(cfg)
    r2 = train_ddpm(resumed, diffusion, _data(), **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(r1["ema"].model.parameters(), r2["ema"].model.parameters()):
        assert torch.equal(a, b)
    assert r1["loss"] == r2["loss"] and len(r2["loss"]) == 10
    assert r1["ema"].num_updates == r2["ema"].num_updates == 10
