"""Chapter 21: our UNet with diffusers' transformer block (and chapter 20's cross-attention
block) equal to UNet2DConditionModel with ported weights, and chapter 20's model in a diffusers
pipeline."""

import pytest
import torch

from groundup.contrib import SMALLEST_FULL_CONFIG
from groundup.ddpm import GaussianDiffusion, linear_beta_schedule
from groundup.guidance import ClassifierFreeGuidance
from groundup.iddpm import ddim_sample, respace
from groundup.text_cond import CaptionConditioned, context_mask
from groundup.unet import UNet, UNetConfig
from groundup.unet_cond import (SpatialTransformer, TextToImagePipeline, condition_unet_kwargs,
                                condition_unet_like, to_diffusers_condition_unet)


def small_config(**kw) -> UNetConfig:
    base = dict(in_channels=4, out_channels=4, image_size=8, base_channels=8, channel_mult=(1, 2),
                attention_levels=(True, False), layers_per_block=1, norm_groups=4,
                attention_head_dim=4, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
                norm_eps=1e-5, dropout=0.0, attention_type="transformer", cross_attention_dim=12)
    return UNetConfig(**(base | kw))


def randomized(model, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


CONFIGS = {
    "walk-through": small_config(),
    "3 levels, class labels": small_config(channel_mult=(1, 2, 2), num_class_embeds=3,
                                           attention_levels=(False, True, True)),
    "chapter 20's cross-attention": small_config(attention_type="cross"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_equals_unet2dconditionmodel(name):
    cfg = CONFIGS[name]
    assert UNet(cfg).num_params() == condition_unet_like(UNet(cfg)).num_parameters()


def test_the_walk_through_config_differs_only_in_how_heads_are_given():
    from diffusers import UNet2DConditionModel

    ours = UNet2DConditionModel(**condition_unet_kwargs(small_config())).config
    theirs = UNet2DConditionModel(**SMALLEST_FULL_CONFIG).config
    differ = {k for k, v in theirs.items() if not k.startswith("_") and ours[k] != v}
    assert differ == {"attention_head_dim"}
    assert tuple(ours["attention_head_dim"]) == (2, 4)              # heads of width 4 per level


def test_stable_diffusion_size_parameter_count():
    from diffusers import UNet2DConditionModel

    cfg = small_config(image_size=64, base_channels=320, channel_mult=(1, 2, 4, 4),
                       attention_levels=(True, True, True, False), layers_per_block=2,
                       norm_groups=32, attention_head_dim=40, cross_attention_dim=768)
    with torch.device("meta"):
        ours = UNet(cfg).num_params()
        theirs = UNet2DConditionModel(cross_attention_dim=768).num_parameters()
    assert ours == theirs


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_outputs_equal_unet2dconditionmodel_with_ported_weights(name, dtype, tol):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ours = randomized(UNet(cfg)).to(dtype).eval()
    ref = to_diffusers_condition_unet(ours)
    x = torch.randn(3, 4, 8, 8, dtype=dtype)
    t = torch.tensor([0, 417, 999])
    ctx = torch.randn(3, 5, 12, dtype=dtype)
    ctx[1, 2:] = 0                                                   # padding: zero rows
    y = torch.tensor([0, 2, 1]) if cfg.num_class_embeds else None
    with torch.no_grad():
        a = ours(x, t, class_labels=y, context=ctx)
        b = ref(x, t, encoder_hidden_states=ctx, encoder_attention_mask=context_mask(ctx),
                class_labels=y).sample
    assert ((a - b).abs().max() / b.abs().max()).item() < tol
    ctx_unmasked = ctx.clone()
    ctx_unmasked[1, 2:] = 1e-3                                       # no longer padding: differs
    with torch.no_grad():
        c = ours(x, t, class_labels=y, context=ctx_unmasked)
    assert (c - a).abs().max().item() > 1e-4


def test_spatial_transformer_equals_transformer2dmodel():
    from diffusers import UNet2DConditionModel

    ref = UNet2DConditionModel(**SMALLEST_FULL_CONFIG).down_blocks[0].attentions[0]
    theirs = randomized(ref, std=0.3).double().eval()
    ours = SpatialTransformer(8, heads=2, context_dim=12, groups=4).double()
    ours.load_state_dict({k.replace(".to_out.0.", ".to_out."): v
                          for k, v in theirs.state_dict().items()})
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    ctx = torch.randn(2, 5, 12, dtype=torch.float64)
    ctx[0, 4:] = 0
    bias = (1 - context_mask(ctx).double())[:, None] * -10000.0
    with torch.no_grad():
        err = (ours(x, ctx) - theirs(x, encoder_hidden_states=ctx, encoder_attention_mask=bias,
                                     return_dict=False)[0]).abs().max().item()
    assert err < 1e-12
    with pytest.raises(ValueError, match="context"):
        ours(x)


def test_refuses_what_does_not_convert():
    with pytest.raises(ValueError, match="only 'transformer'"):
        condition_unet_kwargs(UNetConfig(base_channels=16, channel_mult=(1, 2),
                                         attention_levels=(False, True), norm_groups=8))
    with pytest.raises(ValueError, match="mid_attention=False"):       # diffusers: one resnet there
        condition_unet_kwargs(small_config(mid_attention=False))


def test_pipeline_samples_equal_ours_from_the_same_noise():
    """Chapter 20's kind of model (cross-attention, guidance) through TextToImagePipeline with a
    DDIMScheduler given our float64 schedule: the same samples as chapter 17's DDIM with chapter
    18's guidance, from the same x_T and the same token embeddings."""
    from diffusers import DDIMScheduler

    T, K, w = 1000, 5, 2.0
    cfg = UNetConfig(in_channels=1, out_channels=1, image_size=8, base_channels=8,
                     channel_mult=(1, 2), attention_levels=(False, True), layers_per_block=1,
                     norm_groups=8, dropout=0.0, attention_type="cross", cross_attention_dim=6,
                     attention_head_dim=8)
    torch.manual_seed(0)
    unet = randomized(UNet(cfg), std=0.1).double().eval()
    tokens = torch.randn(3, 4, 6, dtype=torch.float64)
    tokens[1, 2:] = 0
    tokens[2, 1:] = 0                                                # row 2: the null caption
    diffusion = GaussianDiffusion(linear_beta_schedule(T))
    short = respace(diffusion, torch.arange(0, T, T // K))
    x_T = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    captioned = CaptionConditioned(unet, tokens, null_index=2)
    guided = ClassifierFreeGuidance(captioned, w, {"caption_ids": 2})
    ours = ddim_sample(short, guided, x_T.shape, x_T=x_T, progress_bar=False,
                       model_kwargs={"caption_ids": torch.tensor([0, 1])})
    scheduler = DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4,
                              beta_end=0.02, clip_sample=True, set_alpha_to_one=True,
                              timestep_spacing="leading")
    scheduler.alphas_cumprod = diffusion.alpha_bar.clone()
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    pipe = TextToImagePipeline(to_diffusers_condition_unet(unet), scheduler, None, None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=tokens[:2], negative_prompt_embeds=tokens[2:],
                  guidance_scale=1 + w, num_inference_steps=K, latents=x_T).images
    assert torch.equal(pipe.scheduler.timesteps.flip(0), short.timestep_map)
    assert (ours - theirs).abs().max().item() < 1e-10
    unguided = pipe(prompt_embeds=tokens[:2], num_inference_steps=K, latents=x_T).images
    assert (unguided - theirs).abs().max().item() > 1e-4
