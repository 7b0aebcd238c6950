"""Tests of groundup.unet (chapter 16): the timestep embedding, the UNet against diffusers' UNet2DModel
(unconditional and class-conditional), the port's refusals, the attention extension point, and chapter 15's
training loop as chapter 16 configures it (flips), exactly resumable."""

import math

import pytest
import torch
from conftest import Crash, crashing_progress

from groundup.ddpm import GaussianDiffusion, linear_beta_schedule, train_diffusion
from groundup.unet import (ATTENTION_BLOCKS, AttentionBlock, UNet, UNetConfig, diffusers_unet_kwargs,
                           from_diffusers_unet, sample_images, timestep_embedding, to_diffusers_unet)

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

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


def test_float64_weights_port_without_rounding():
    """Weights that float32 cannot hold (a float64 model trained or perturbed in float64) reach diffusers exactly:
    the copy is cast before it is loaded, not after."""
    ours = randomize_(UNet(TINY)).double().eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1e-12 * torch.randn_like(p))              # below float32's resolution for these values
    ref = to_diffusers_unet(ours)
    theirs = ref.state_dict()
    for name, value in ours.state_dict().items():
        assert torch.equal(theirs[name.replace(".to_out.", ".to_out.0.")], value), name


def test_wrong_skip_order_is_detected():
    cfg = UNetConfig(**{**TINY.__dict__, "base_channels": 16, "norm_groups": 8, "layers_per_block": 2})
    ours = randomize_(UNet(cfg)).double().eval()          # two skips of equal width on top of the stack
    ref = to_diffusers_unet(ours)
    block = ours.up_blocks[0]
    original = block.forward

    def swapped(x, skips, temb, context=None):
        skips[-1], skips[-2] = skips[-2], skips[-1]
        return original(x, skips, temb, context)

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


def test_training_loop_learns_and_samples():
    torch.manual_seed(0)
    model = UNet(TINY).zero_init_residuals_()
    diffusion = GaussianDiffusion(linear_beta_schedule(20))
    run = train_diffusion(model, diffusion, _data(), steps=30, batch_size=8, lr=3e-3, ema_decay=0.9, seed=0,
                          flip=True)
    losses = [v for _, v in run["loss"]]
    assert len(losses) == 30 and losses[0] == pytest.approx(1.0, abs=0.3)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10
    imgs = sample_images(diffusion, run["ema"].model, 5, batch_size=3, device="cpu", image_shape=(3, 8, 8),
                         progress_bar=False)
    assert imgs.shape == (5, 3, 8, 8) and imgs.min() >= 0 and imgs.max() <= 1


def test_training_loop_with_flips_resumes_exactly(tmp_path, monkeypatch):
    """Killed after its step-6 checkpoint and resumed: the same weights, EMA weights and losses as a run that
    never stopped (dropout, flips, timesteps and noise included)."""
    import groundup.ddpm as ddpm

    cfg = UNetConfig(**{**TINY.__dict__, "dropout": 0.3})
    diffusion = GaussianDiffusion(linear_beta_schedule(20))
    kw = dict(steps=10, batch_size=8, lr=3e-3, warmup=3, ema_decay=0.9, ema_warmup=True, seed=2, save_every=3,
              flip=True)

    torch.manual_seed(0)
    straight = UNet(cfg)
    r1 = train_diffusion(straight, diffusion, _data(), **kw)

    ckpt = tmp_path / "ddpm.safetensors"
    monkeypatch.setattr(ddpm, "progress", crashing_progress(8))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_diffusion(UNet(cfg), diffusion, _data(), **kw, checkpoint=ckpt)
    monkeypatch.undo()
    torch.manual_seed(123)                     # different init and RNG: everything must come from the checkpoint
    resumed = UNet(cfg)
    r2 = train_diffusion(resumed, diffusion, _data(), **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(r1["ema"].model.parameters(), r2["ema"].model.parameters()):
        assert torch.equal(a, b)
    assert r1["loss"] == r2["loss"] and len(r2["loss"]) == 10
    assert r1["ema"].num_updates == r2["ema"].num_updates == 10


def test_time_embedding_width_follows_diffusers():
    """diffusers' time embedding is 4 x block_out_channels[0] wide: with a first multiplier of 2, a width
    computed from base_channels gives another parameter count and a state dict UNet2DModel cannot load."""
    from diffusers import UNet2DModel

    cfg = UNetConfig(**{**TINY.__dict__, "channel_mult": (2, 4), "norm_groups": 8})
    with torch.device("meta"):
        assert UNet(cfg).num_params() == UNet2DModel(**diffusers_unet_kwargs(cfg)).num_parameters()
    ours = randomize_(UNet(cfg)).double().eval()
    ref = to_diffusers_unet(ours)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        a, b = ours(x, torch.tensor([5, 700])), ref(x, torch.tensor([5, 700])).sample
        assert (a - b).abs().max() / b.abs().max() < 1e-12
        assert torch.equal(from_diffusers_unet(ref)(x, torch.tensor([5, 700])), a)


def test_class_conditional_unet_equals_unet2dmodel_with_num_class_embeds():
    cfg = UNetConfig(**{**TINY.__dict__, "base_channels": 16, "norm_groups": 8, "num_class_embeds": 5,
                        "null_class": True})
    ours = randomize_(UNet(cfg)).double().eval()
    ref = to_diffusers_unet(ours)
    assert ref.config.num_class_embeds == 5 and ours.num_params() == ref.num_parameters()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t, y = torch.tensor([0, 300, 999]), torch.tensor([0, 2, 4])
    with torch.no_grad():
        a, b = ours(x, t, class_labels=y), ref(x, t, class_labels=y).sample
        assert (a - b).abs().max() / b.abs().max() < 1e-12
        assert (ours(x, t, class_labels=torch.tensor([1, 3, 0])) - a).abs().max() > 1e-3   # labels matter
        assert ours.null_class_index == 4
        assert torch.equal(ours(x, t), ours(x, t, class_labels=torch.full((3,), 4)))   # None: the null class
        back = from_diffusers_unet(ref, null_class=True)
        assert torch.equal(back(x, t, class_labels=y), a) and back.null_class_index == 4
    with pytest.raises(ValueError, match="class_labels"):
        UNet(UNetConfig(**{**cfg.__dict__, "null_class": False}))(x.float(), t)   # labels needed
    with pytest.raises(ValueError, match="no class embedding"):
        UNet(TINY)(x.float(), t, class_labels=y)
    with pytest.raises(ValueError, match="null class"):
        UNetConfig(num_class_embeds=1, null_class=True)


@pytest.mark.parametrize("option", [
    dict(center_input_sample=True), dict(act_fn="mish"), dict(resnet_time_scale_shift="scale_shift"),
    dict(time_embedding_type="fourier"), dict(mid_block_scale_factor=2.0), dict(class_embed_type="timestep"),
    dict(time_embedding_dim=64), dict(downsample_type="resnet"), dict(upsample_type="resnet"),
    dict(attn_norm_num_groups=2), dict(mid_block_type=None),
    dict(down_block_types=("DownBlock2D", "SkipDownBlock2D"), up_block_types=("SkipUpBlock2D", "UpBlock2D")),
])
def test_from_diffusers_unet_refuses_what_it_does_not_implement(option):
    from diffusers import UNet2DModel

    cfg = UNetConfig(**{**TINY.__dict__, "base_channels": 16, "norm_groups": 8})
    ref = UNet2DModel(**{**diffusers_unet_kwargs(cfg), **option})
    with pytest.raises(ValueError, match=next(iter(option))):
        from_diffusers_unet(ref)


def test_to_diffusers_unet_keeps_the_memory_format():
    """Chapter 16 compares samples of ours and of the port: both must compute with the same layout."""
    ours = UNet(TINY).to(memory_format=torch.channels_last)
    ref = to_diffusers_unet(ours)
    assert ref.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not ref.conv_in.weight.is_contiguous()
    assert to_diffusers_unet(UNet(TINY)).conv_in.weight.is_contiguous()


def test_attention_blocks_are_chosen_in_one_place_and_receive_the_context():
    """The extension point of chapters 20-21: a registered attention block gets the UNet's context."""
    seen = []

    class Probe(AttentionBlock):
        def forward(self, x, context=None):
            seen.append(context)
            return super().forward(x)

    ATTENTION_BLOCKS["probe"] = lambda c, cfg: Probe(c, cfg.norm_groups, cfg.norm_eps)
    try:
        cfg = UNetConfig(**{**TINY.__dict__, "attention_type": "probe", "cross_attention_dim": 7})
        model = UNet(cfg)
        context = torch.randn(2, 5, 7)
        assert model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), context=context).shape == (2, 3, 8, 8)
        n_attention = sum(isinstance(m, Probe) for m in model.modules())
        assert n_attention == 4 and len(seen) == 4 and all(c is context for c in seen)   # 1 down, 1 mid, 2 up
        with pytest.raises(ValueError, match="cross-attention"):
            diffusers_unet_kwargs(cfg)
    finally:
        del ATTENTION_BLOCKS["probe"]
    with pytest.raises(ValueError, match="no cross-attention"):
        UNet(TINY)(torch.randn(2, 3, 8, 8), 0, context=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="attention_type"):
        UNetConfig(attention_type="no-such-block")


def test_later_chapters_blocks_load_by_name():
    """attention_type="cross" / "transformer" work without importing chapter 20's or 21's module first:
    run in a fresh interpreter, where nothing has registered them yet."""
    import subprocess
    import sys
    code = ("import sys; from groundup.unet import UNetConfig, ATTENTION_BLOCKS; "
            "assert 'cross' not in ATTENTION_BLOCKS and 'groundup.text_cond' not in sys.modules; "
            "UNetConfig(base_channels=8, channel_mult=(1, 2), attention_levels=(False, True), norm_groups=4, "
            "image_size=8, attention_type='cross', cross_attention_dim=7); "
            "UNetConfig(base_channels=8, channel_mult=(1, 2), attention_levels=(False, True), norm_groups=4, "
            "image_size=8, attention_type='transformer', cross_attention_dim=7); "
            "assert {'cross', 'transformer'} <= set(ATTENTION_BLOCKS)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
