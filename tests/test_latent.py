"""Chapter 19's exported code: the KL autoencoder, the scale factor (groundup.latent)."""

import math

import pytest
import torch
import torch.nn as nn
from conftest import crash_then_resume

import groundup.latent as latent
from groundup.latent import (AutoencoderConfig, DiagonalGaussian, KLAutoencoder, autoencoder_loss,
                             decode_latents, diffusers_autoencoder_kwargs, encode_latents,
                             latent_scale_factor, to_diffusers_autoencoder, train_autoencoder)
from groundup.unet import ResnetBlock

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

SMALL = AutoencoderConfig(block_out_channels=(8, 16, 16), latent_channels=4)


def random_autoencoder(cfg=SMALL, seed=0):
    torch.manual_seed(seed)
    model = KLAutoencoder(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_shapes_and_downsampling_factor():
    model = KLAutoencoder(SMALL)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    assert SMALL.downsampling == 4
    assert out["z"].shape == (2, 4, 8, 8)
    assert out["x_hat"].shape == x.shape
    assert model.encode(torch.randn(1, 1, 28, 28)).mean.shape == (1, 4, 7, 7)
    two = KLAutoencoder(AutoencoderConfig(block_out_channels=(8, 8), latent_channels=2))
    assert two.encode(x).mean.shape == (2, 2, 16, 16)
    with pytest.raises(ValueError):
        AutoencoderConfig(block_out_channels=(8, 12), norm_groups=8)


def test_resnet_block_without_time_embedding():
    block = ResnetBlock(8, 16, temb_dim=None, dropout=0.0, groups=8, eps=1e-6)
    assert block.time_emb_proj is None
    assert block(torch.randn(2, 8, 4, 4)).shape == (2, 16, 4, 4)
    with pytest.raises(ValueError):
        block(torch.randn(2, 8, 4, 4), torch.randn(2, 32))
    timed = ResnetBlock(8, 16, temb_dim=32, dropout=0.0, groups=8, eps=1e-6)
    assert timed.time_emb_proj is not None


@pytest.mark.parametrize("mid_attention", [True, False])
def test_equals_diffusers_autoencoder_kl(mid_attention):
    from diffusers import AutoencoderKL

    cfg = AutoencoderConfig(block_out_channels=(8, 16, 16), mid_attention=mid_attention)
    ours = random_autoencoder(cfg)
    ref = to_diffusers_autoencoder(ours)
    assert isinstance(ref, AutoencoderKL)
    assert sum(p.numel() for p in ref.parameters()) == ours.num_params()
    built = AutoencoderKL(**diffusers_autoencoder_kwargs(cfg))
    assert sum(p.numel() for p in built.parameters()) == ours.num_params()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 32, 32, generator=g, dtype=torch.float64)
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        a, b = ours.encode(x), ref.encode(x).latent_dist
        assert (a.mean - b.mean).abs().max() < 1e-12
        assert (a.logvar - b.logvar).abs().max() < 1e-12
        assert (a.kl() - b.kl()).abs().max() < 1e-10
        assert (ours.decode(z) - ref.decode(z).sample).abs().max() < 1e-12
        mine = ours(x, generator=torch.Generator().manual_seed(5))["x_hat"]
        theirs = ref(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample
        assert (mine - theirs).abs().max() < 1e-12


def test_diffusers_check_catches_a_wrong_norm_epsilon():
    ours = random_autoencoder()
    ref = to_diffusers_autoencoder(ours)
    for m in ours.modules():
        if isinstance(m, nn.GroupNorm):
            m.eps = 1e-5
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (ours.encode(x).mean - ref.encode(x).latent_dist.mean).abs().max() > 1e-9


def test_kl_closed_form_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    moments = torch.randn(3, 6, 2, 2, generator=g, dtype=torch.float64)
    post = DiagonalGaussian(moments)
    q = torch.distributions.Normal(post.mean, post.std)
    p = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.std))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(post.kl(), expected, atol=1e-12)
    # N(0, I) itself has zero KL
    assert post.__class__(torch.zeros(1, 6, 2, 2)).kl().abs().max() == 0


def test_posterior_sample_is_the_reparameterization_and_logvar_is_clamped():
    moments = torch.cat([torch.full((1, 2, 1, 1), 3.0), torch.full((1, 2, 1, 1), 50.0)], dim=1)
    post = DiagonalGaussian(moments)
    assert post.logvar.max() == 20.0                                   # clamped, as LDM
    eps = torch.randn(1, 2, 1, 1, generator=torch.Generator().manual_seed(4))
    z = post.sample(torch.Generator().manual_seed(4))
    assert torch.allclose(z, 3.0 + math.exp(10.0) * eps)
    assert torch.equal(post.mode(), post.mean)


def test_loss_is_l1_plus_weighted_kl():
    model = random_autoencoder()
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    out = autoencoder_loss(model, x, kl_weight=0.5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x, generator=torch.Generator().manual_seed(2))
    rec = (ref["x_hat"] - x).abs().flatten(1).sum(1)
    kl = ref["posterior"].kl()
    assert torch.allclose(out["loss"].double(), (rec + 0.5 * kl).mean().double(), rtol=1e-5)
    l2 = autoencoder_loss(model, x, 0.0, generator=torch.Generator().manual_seed(2), rec="l2")
    assert torch.allclose(l2["loss"].double(),
                          (0.5 * (ref["x_hat"] - x).pow(2).flatten(1).sum(1)).mean(), rtol=1e-5)
    with pytest.raises(ValueError):
        autoencoder_loss(model, x, 0.0, rec="huber")


def test_scale_factor_gives_unit_std():
    model = random_autoencoder().float()
    images = torch.rand(64, 1, 32, 32) * 2 - 1
    s = latent_scale_factor(model, images, seed=0)
    z = encode_latents(model, images, seed=0)
    assert math.isclose(s, 1.0 / z.flatten().std().item(), rel_tol=1e-6)
    assert abs(encode_latents(model, images, scale=s, seed=0).std().item() - 1.0) < 1e-5
    # the scale undoes itself when decoding
    zs = encode_latents(model, images[:4], scale=s, sample=False)
    z1 = encode_latents(model, images[:4], sample=False)
    assert torch.allclose(decode_latents(model, zs, scale=s), decode_latents(model, z1), atol=1e-5)


def test_training_reduces_the_loss():
    torch.manual_seed(0)
    model = KLAutoencoder(AutoencoderConfig(block_out_channels=(8, 8), latent_channels=2))
    images = (torch.rand(32, 1, 16, 16) > 0.7).float() * 2 - 1
    run = train_autoencoder(model, images, steps=30, batch_size=8, lr=3e-3, kl_weight=1e-3)
    first, last = run["rec"][0][1], sum(v for _, v in run["rec"][-5:]) / 5
    assert last < 0.8 * first
    assert not model.training


def test_checkpoint_resume_is_exact(tmp_path, monkeypatch):
    cfg = AutoencoderConfig(block_out_channels=(8, 8), latent_channels=2)
    images = torch.rand(48, 1, 16, 16) * 2 - 1

    def train(model, checkpoint=None):
        return train_autoencoder(model, images, steps=7, batch_size=8, lr=1e-3, kl_weight=1e-2,
                                 seed=2, save_every=3, checkpoint=checkpoint)

    torch.manual_seed(0)
    straight = KLAutoencoder(cfg)
    h1 = train(straight)
    resumed, h2 = crash_then_resume(monkeypatch, latent, 5, train, lambda: KLAutoencoder(cfg),
                                    tmp_path / "ae.safetensors")
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert h1["loss"] == h2["loss"]
