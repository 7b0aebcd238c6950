"""Chapter 18's exported code: classifier-free guidance and label dropout (groundup.guidance)."""

import pytest
import torch
from conftest import Crash, crashing_progress

from groundup.ddpm import EMA, GaussianDiffusion, linear_beta_schedule, train_diffusion
from groundup.guidance import (ClassifierFreeGuidance, LabelDropout, guided_prediction,
                               null_condition)
from groundup.iddpm import ddim_sample, respace, spaced_timesteps
from groundup.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread


def small_unet(seed=0, out_channels=1, dropout=0.0):
    torch.manual_seed(seed)
    cfg = UNetConfig(in_channels=1, out_channels=out_channels, image_size=8, base_channels=8,
                     channel_mult=(1, 2), attention_levels=(False, True), layers_per_block=1,
                     norm_groups=8, dropout=dropout, num_class_embeds=11, null_class=True)
    net = UNet(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net


def test_guided_prediction_is_diffusers_formula_with_scale_one_plus_w():
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(3, 4, generator=g, dtype=torch.float64)
    uncond = torch.randn(3, 4, generator=g, dtype=torch.float64)
    for w in (0.0, 0.3, 1.0, 7.5):
        s = 1 + w                                                   # diffusers' guidance_scale
        diffusers_style = uncond + s * (cond - uncond)
        assert torch.allclose(guided_prediction(cond, uncond, w), diffusers_style, atol=1e-12)
    assert torch.equal(guided_prediction(cond, uncond, 0.0), cond)
    assert torch.allclose(guided_prediction(cond, uncond, -1.0), uncond, atol=1e-15)
    # using the scale where the weight belongs is a different prediction
    assert not torch.allclose(guided_prediction(cond, uncond, 2.0), uncond + 2.0 * (cond - uncond))


def test_guided_unet_equals_two_separate_passes():
    net = small_unet().double().eval()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([1, 200, 500, 999]), torch.tensor([0, 4, 7, 9])
    null = net.null_class_index
    with torch.no_grad():
        eps_c = net(x, t, class_labels=y)
        eps_u = net(x, t, class_labels=torch.full_like(y, null))
        for w in (0.5, 3.0):
            guided = ClassifierFreeGuidance(net, w, {"class_labels": null})(x, t, class_labels=y)
            assert torch.allclose(guided, (1 + w) * eps_c - w * eps_u, atol=1e-12)
        # w = 0 is the conditional network itself; a scalar t broadcasts
        unguided = ClassifierFreeGuidance(net, 0.0, {"class_labels": null})
        assert torch.equal(unguided(x, t, class_labels=y), eps_c)
        one_t = ClassifierFreeGuidance(net, 1.0, {"class_labels": null})(x, 500, class_labels=y)
        full_t = ClassifierFreeGuidance(net, 1.0, {"class_labels": null})(x, torch.full((4,), 500),
                                                                          class_labels=y)
        assert torch.allclose(one_t, full_t, atol=1e-12)
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(net, 1.0, {"class_labels": null})(x, t)       # no condition given
    with pytest.raises(ValueError):
        ClassifierFreeGuidance(net, 1.0, {})


def test_guided_channels_guide_only_eps_of_a_learned_variance_model():
    net = small_unet(out_channels=2).double().eval()                        # eps and v channels
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([5, 50, 500]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        c = net(x, t, class_labels=y)
        u = net(x, t, class_labels=torch.full_like(y, net.null_class_index))
        out = ClassifierFreeGuidance(net, 2.0, {"class_labels": net.null_class_index},
                                     guided_channels=1)(x, t, class_labels=y)
    assert torch.allclose(out[:, :1], 3 * c[:, :1] - 2 * u[:, :1], atol=1e-12)
    assert torch.allclose(out[:, 1:], c[:, 1:], atol=1e-12)     # the conditional pass's variance


def test_null_condition_for_indices_and_tensors():
    labels = torch.tensor([3, 1, 4])
    assert null_condition(10, labels, 3).tolist() == [10, 10, 10]
    context = torch.randn(3, 5, 8)
    empty = torch.randn(1, 5, 8)
    assert torch.equal(null_condition(empty, context, 3), empty.expand(3, 5, 8))
    with pytest.raises(ValueError):
        null_condition(torch.randn(1, 4, 8), context, 3)


def test_guided_model_runs_through_the_samplers_unchanged():
    net = small_unet().double().eval()
    diffusion = GaussianDiffusion(linear_beta_schedule(50, 1e-3, 0.2))
    short = respace(diffusion, spaced_timesteps(50, 5))
    y = torch.tensor([0, 5])
    x_T = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    guided0 = ClassifierFreeGuidance(net, 0.0, {"class_labels": net.null_class_index})
    kw = dict(x_T=x_T, progress_bar=False, model_kwargs={"class_labels": y})
    a = ddim_sample(short, guided0, x_T.shape, **kw)
    b = ddim_sample(short, net, x_T.shape, **kw)
    assert torch.equal(a, b)                         # w = 0: the conditional model's samples
    guided = ClassifierFreeGuidance(net, 3.0, {"class_labels": net.null_class_index})
    c = ddim_sample(short, guided, x_T.shape, **kw)
    d = diffusion.sample(guided, x_T.shape, **kw, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(c).all() and torch.isfinite(d).all() and (c - a).abs().max() > 1e-4


def test_label_dropout_matches_diffusers_label_embedding():
    from diffusers.models.embeddings import LabelEmbedding

    net = small_unet()
    p = 0.25
    ours = LabelDropout(net, p).train()
    ref = LabelEmbedding(10, net.class_embedding.embedding_dim, p).train()
    ref.embedding_table.load_state_dict(net.class_embedding.state_dict())
    labels = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    a = ours.drop(labels)
    torch.manual_seed(5)
    b = ref.token_drop(labels)
    assert torch.equal(a, b)
    share = (a == net.null_class_index).float().mean().item()
    assert abs(share - p) < 5 * (p * (1 - p) / len(labels)) ** 0.5
    kept = a != net.null_class_index
    assert torch.equal(a[kept], labels[kept])                 # the other labels are unchanged


def test_label_dropout_only_in_training_mode_and_validates():
    net = small_unet().eval()
    x, t, y = torch.randn(6, 1, 8, 8), torch.tensor([3] * 6), torch.arange(6)
    wrapped = LabelDropout(net, 0.9).eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x, t, class_labels=y), net(x, t, class_labels=y))
    wrapped.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(wrapped(x, t, class_labels=y), net(x, t, class_labels=y))
    with pytest.raises(ValueError):
        LabelDropout(net, 1.0)
    no_null = UNet(UNetConfig(in_channels=1, out_channels=1, image_size=8, base_channels=8,
                              channel_mult=(1, 2), attention_levels=(False, True), norm_groups=8,
                              num_class_embeds=10))
    with pytest.raises(ValueError):
        LabelDropout(no_null, 0.1)


def test_train_diffusion_with_label_dropout_resumes_exactly(tmp_path, monkeypatch):
    """The dropout draws come from the global generator, whose state the checkpoint keeps."""
    import groundup.ddpm as ddpm

    small = GaussianDiffusion(linear_beta_schedule(30, 3e-3, 0.5))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(48, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (48,), generator=g)
    kw = dict(steps=8, batch_size=8, lr=1e-3, seed=2, warmup=2, save_every=3,
              model_kwargs={"class_labels": labels})

    straight = LabelDropout(small_unet(seed=0, dropout=0.1), 0.5)
    straight_ema = EMA(straight, 0.9, warmup=True)
    torch.manual_seed(7)
    h1 = train_diffusion(straight, small, images, ema=straight_ema, **kw)

    ckpt = tmp_path / "cfg.safetensors"
    crashed = LabelDropout(small_unet(seed=0, dropout=0.1), 0.5)
    monkeypatch.setattr(ddpm, "progress", crashing_progress(5))
    torch.manual_seed(7)
    with pytest.raises(Crash):
        train_diffusion(crashed, small, images, ema=EMA(crashed, 0.9, warmup=True), **kw,
                        checkpoint=ckpt)
    monkeypatch.undo()
    resumed = LabelDropout(small_unet(seed=1, dropout=0.1), 0.5)
    resumed_ema = EMA(resumed, 0.9, warmup=True)
    torch.manual_seed(123)                    # everything must come from the checkpoint
    h2 = train_diffusion(resumed, small, images, ema=resumed_ema, **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight_ema.model.parameters(), resumed_ema.model.parameters()):
        assert torch.equal(a, b)
    assert h1["loss"] == h2["loss"] and len(h2["loss"]) == 8
