"""Tests of the code chapter 05 exports (lib/groundup/attention.py)."""

import functools
import math

import pytest
import torch

from conftest import Crash, crashing_progress
import torch.nn as nn
import torch.nn.functional as F

from groundup.attention import (AttentionOnlyLM, MultiHeadAttention, additive_mask, benchmark_attention, causal_mask,
                                evaluate_copy, make_copy_data, padding_mask, profile_call,
                                next_token_loss, scaled_dot_product_attention)
from groundup.basics import Adam
from groundup.runtime import batch_indices
from groundup.train import train, warmup_cosine_lr


def _qkv(T, S, dtype, seed=0, B=2, H=3, d=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, d, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H, S, d, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def test_masks():
    assert torch.equal(causal_mask(3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    assert causal_mask(2, 4).tolist() == [[True, False, False, False], [True, True, False, False]]
    assert padding_mask(torch.tensor([2, 4]), 4).tolist() == [[True, True, False, False], [True] * 4]
    add = additive_mask(causal_mask(2))
    assert add[0, 1] == -math.inf and add[1, 0] == 0 and add.dtype == torch.float32


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("T,S", [(7, 7), (5, 9)])
def test_matches_sdpa_with_masks(dtype, tol, T, S):
    q, k, v = _qkv(T, S, dtype)
    bool_mask = torch.rand(2, 3, T, S, generator=torch.Generator().manual_seed(1)) < 0.6
    bool_mask[..., 0] = True
    cases = [(None, False), (None, True), (bool_mask, False), (additive_mask(bool_mask, dtype), False),
             (padding_mask(torch.tensor([S, 2]), S)[:, None, None, :], False)]
    for mask, causal in cases:
        ours, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        assert (ours - ref).abs().max().item() <= tol
        assert torch.allclose(weights.sum(-1), torch.ones((), dtype=dtype))


def test_gradients_match_sdpa_float64():
    q, k, v = _qkv(5, 9, torch.float64)
    mask = torch.rand(2, 3, 5, 9, generator=torch.Generator().manual_seed(2)) < 0.5
    mask[..., 3] = True
    grads = []
    for fn in (lambda *t: scaled_dot_product_attention(*t, attn_mask=mask, is_causal=False)[0],
               lambda *t: F.scaled_dot_product_attention(*t, attn_mask=mask)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves).pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-12)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(4, 4, torch.float32))
    mask = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = False
    out, weights = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.equal(out[0, 1, 2], torch.zeros(16)) and torch.equal(weights[0, 1, 2], torch.zeros(4))
    out.sum().backward()
    assert all(t.grad.isfinite().all() for t in (q, k, v))
    assert torch.equal(q.grad[0, 1, 2], torch.zeros(16))
    # the other rows are untouched by the special case
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    keep = mask.any(-1)
    assert torch.allclose(out[keep], ref[keep], atol=1e-5)


def test_broken_scale_and_missing_mask_fail():
    q, k, v = _qkv(7, 7, torch.float32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / 16)[0], ref, atol=1e-5)
    assert not torch.allclose(scaled_dot_product_attention(q, k, v)[0], ref, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_mha_matches_torch_with_copied_weights(dtype, tol):
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(24, 3, batch_first=True).to(dtype)
    with torch.no_grad():
        theirs.in_proj_bias.normal_()
        theirs.out_proj.bias.normal_()
    ours = MultiHeadAttention(24, 3).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 8, 24, dtype=dtype)
    keep = padding_mask(torch.tensor([8, 5, 1]), 8)
    causal = causal_mask(8)
    for average in (True, False):
        out, w = ours(x, x, x, key_padding_mask=keep, attn_mask=causal, average_attn_weights=average)
        ref, ref_w = theirs(x, x, x, key_padding_mask=~keep, attn_mask=~causal, average_attn_weights=average)
        assert (out - ref).abs().max().item() <= tol and (w - ref_w).abs().max().item() <= tol
    out, _ = ours(x, x, x, key_padding_mask=keep, is_causal=True)        # is_causal = the explicit causal mask
    assert torch.allclose(out, ref, atol=tol)
    xkv = torch.randn(3, 11, 24, dtype=dtype)                            # cross-attention
    keep = padding_mask(torch.tensor([11, 4, 7]), 11)
    out, w = ours(x, xkv, xkv, key_padding_mask=keep)
    ref, ref_w = theirs(x, xkv, xkv, key_padding_mask=~keep)
    assert (out - ref).abs().max().item() <= tol and (w - ref_w).abs().max().item() <= tol


def test_mha_weights_copy_back_and_fused_path():
    ours = MultiHeadAttention(16, 4)
    theirs = nn.MultiheadAttention(16, 4, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 6, 16)
    out, _ = ours(x, x, x, is_causal=True)
    assert torch.allclose(theirs(x, x, x, attn_mask=~causal_mask(6))[0], out, atol=1e-5)
    ours.fused = True
    fused, w = ours(x, x, x, is_causal=True, need_weights=False)
    assert w is None and torch.allclose(fused, out, atol=1e-5)


def test_mha_padding_is_invisible_and_wrong_head_split_fails():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4)
    x = torch.randn(2, 7, 16)
    keep = padding_mask(torch.tensor([7, 4]), 7)
    junk = x.clone()
    junk[1, 4:] = 50 * torch.randn(3, 16)
    assert torch.allclose(mha(x, x, x, key_padding_mask=keep)[0][1, :4], mha(junk, junk, junk, key_padding_mask=keep)[0][1, :4],
                          atol=1e-6)

    class WrongSplit(MultiHeadAttention):
        def split_heads(self, t):
            return t.reshape(t.shape[0], self.num_heads, t.shape[1], self.head_dim)

    broken = WrongSplit(16, 4)
    broken.load_state_dict(mha.state_dict())
    assert not torch.allclose(broken(x, x, x)[0], mha(x, x, x)[0], atol=1e-4)


def test_mha_rejects_indivisible_heads_and_supports_no_bias():
    with pytest.raises(ValueError):
        MultiHeadAttention(10, 3)
    ours = MultiHeadAttention(8, 2, bias=False)
    theirs = nn.MultiheadAttention(8, 2, bias=False, batch_first=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 8)
    assert torch.allclose(ours(x, x, x)[0], theirs(x, x, x)[0], atol=1e-6)


def test_profile_call_sees_cpu_allocations_and_kernel():
    peak, kernel = profile_call(lambda: torch.empty(4 * 2**20, dtype=torch.uint8).fill_(1), "cpu")
    assert peak >= 4 * 2**20 and kernel == "—"
    q, k, v = _qkv(8, 8, torch.float32)
    _, kernel = profile_call(lambda: F.scaled_dot_product_attention(q, k, v), "cpu")
    assert kernel != "—"


def test_benchmark_attention_reports_quadratic_memory():
    ours = lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True)[0]   # noqa: E731
    small, large = (benchmark_attention(ours, batch=1, heads=2, seq_len=T, head_dim=16, repeats=1) for T in (128, 256))
    for r in (small, large):
        assert r["ms"] > 0 and not r["oom"] and r["kernel"] == "—"
    score_bytes = 2 * 256 * 256 * 4
    assert large["peak_bytes"] >= score_bytes                           # at least one score matrix, eq. (7)
    assert large["peak_bytes"] > 3 * small["peak_bytes"]                # grows like T^2, not T


def test_copy_data_and_model_shapes():
    data = make_copy_data(10, 5, 7, seed=0)
    assert data.shape == (10, 11) and (data[:, 5] == 7).all() and torch.equal(data[:, :5], data[:, 6:])
    assert torch.equal(data, make_copy_data(10, 5, 7, seed=0))
    model = AttentionOnlyLM(8, 10, 16, 2, 2)
    logits, maps = model(data[:, :-1], return_weights=True)
    assert logits.shape == (10, 10, 8) and len(maps) == 2 and maps[0].shape == (10, 2, 10, 10)
    assert torch.equal(maps[0].triu(1), torch.zeros_like(maps[0]))        # causal by default
    scores = evaluate_copy(model, data)
    assert set(scores) == {"loss_random_half", "loss_copy", "generation_accuracy"}
    assert 0 <= scores["generation_accuracy"] <= 1


def test_causal_model_cannot_see_the_future():
    model = AttentionOnlyLM(8, 10, 16, 2, 2)
    a = torch.randint(0, 8, (1, 10))
    b = a.clone()
    b[0, 6:] = (b[0, 6:] + 1) % 8
    with torch.no_grad():
        assert torch.allclose(model(a)[0, :6], model(b)[0, :6])
        assert not torch.allclose(model(a, causal=False)[0, :6], model(b, causal=False)[0, :6])


def train_copy_model(model, data, *, steps, batch_size, lr, seed, causal=True, checkpoint=None, save_every=100):
    """Chapter 05's run: the book's loop configured as the notebook configures it."""
    return train(model, lambda step: (data[batch_indices(len(data), batch_size, step, seed)],), steps=steps,
                 optimizer=Adam(model.parameters(), lr=lr), lr_at=lambda step: warmup_cosine_lr(step, steps=steps, lr=lr),
                 loss=functools.partial(next_token_loss, causal=causal), eval_every=save_every, checkpoint=checkpoint)


def test_train_copy_model_resumes_exactly(tmp_path, monkeypatch):
    """A run killed between checkpoints and resumed ends exactly where an uninterrupted one does."""
    import groundup.train as loop

    data = make_copy_data(256, 4, 6, seed=0)
    kw = dict(steps=12, batch_size=32, lr=3e-3, seed=0, save_every=5)

    torch.manual_seed(0)
    straight = AttentionOnlyLM(7, 8, 16, 2, 1)
    h1 = train_copy_model(straight, data, **kw)

    ckpt = tmp_path / "copy.safetensors"
    monkeypatch.setattr(loop, "progress", crashing_progress(8))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_copy_model(AttentionOnlyLM(7, 8, 16, 2, 1), data, **kw, checkpoint=ckpt)
    monkeypatch.undo()
    torch.manual_seed(123)   # a different initialization: everything must come from the checkpoint
    resumed = AttentionOnlyLM(7, 8, 16, 2, 1)
    h2 = train_copy_model(resumed, data, **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert h1["train"] == h2["train"] and h1["grad_norm"] == h2["grad_norm"] and len(h2["train"]) == 12
    assert h1["train"][-1][1] < h1["train"][0][1]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("is_causal", [False, True])
def test_mha_combines_an_additive_mask_with_padding_and_causal_masks(fused, is_causal):
    """A float (additive) attn_mask together with a boolean key-padding mask (and is_causal): the same result
    as one boolean mask that says the same, where the additive mask is 0 or -inf; and a finite additive bias
    is added on top of the padding."""
    torch.manual_seed(0)
    B, T, E = 2, 5, 8
    mha = MultiHeadAttention(E, 2, fused=fused).double().eval()
    x = torch.randn(B, T, E, dtype=torch.float64)
    pad = padding_mask(torch.tensor([5, 3]), T)                                   # (B, S) boolean
    allowed = torch.rand(T, T, generator=torch.Generator().manual_seed(1)) > 0.3
    allowed |= torch.eye(T, dtype=torch.bool)                                     # no query loses every key
    need = not fused
    out_bool, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=allowed, is_causal=is_causal, need_weights=need)
    out_add, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=additive_mask(allowed, torch.float64),
                     is_causal=is_causal, need_weights=need)
    torch.testing.assert_close(out_add, out_bool, rtol=0, atol=1e-12)
    bias = torch.randn(T, T, dtype=torch.float64)                                 # a finite additive bias
    full = pad[:, None, None, :] & (causal_mask(T) if is_causal else True)
    want = F.scaled_dot_product_attention(*(mha.split_heads(F.linear(x, w, b)) for w, b in
                                            zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3))),
                                          attn_mask=additive_mask(full, torch.float64) + bias)
    got, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=bias, is_causal=is_causal, need_weights=need)
    torch.testing.assert_close(got, mha.out_proj(mha.merge_heads(want)), rtol=0, atol=1e-12)
