"""Tests of the code chapter 10 exports (lib/groundup/norm.py, lib/groundup/ablation.py)."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from groundup.ablation import layer_stats, mean_std, separated
from groundup.gpt import GPT, GPTConfig
from groundup.gpt_small import residual_stream_std
from groundup.norm import LayerNorm, RMSNorm, layer_norm_input_grad, rms_norm_input_grad

pytestmark = pytest.mark.usefixtures("one_thread")

E = 12


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 2.5 * torch.randn(3, 5, E, generator=g, dtype=torch.float64) - 1.5       # an offset and a scale
    grad_out = torch.randn(3, 5, E, generator=g, dtype=torch.float64)
    return x, grad_out, g


def _values_and_grads(module, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = module(x)
    (y * grad_out).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_equals_torch_values_and_gradients(bias):
    x, grad_out, g = _inputs()
    ours = LayerNorm(E, bias=bias).double()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(1 + 0.5 * torch.randn(E, generator=g))
    ref = nn.LayerNorm(E, eps=1e-5, bias=bias).double()
    ref.load_state_dict(ours.state_dict())
    got, want = _values_and_grads(ours, x, grad_out), _values_and_grads(ref, x, grad_out)
    assert len(got) == len(want) == (4 if bias else 3)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_rmsnorm_equals_torch_values_and_gradients():
    x, grad_out, g = _inputs(1)
    ours = RMSNorm(E).double()
    with torch.no_grad():
        ours.weight.copy_(1 + 0.5 * torch.randn(E, generator=g))
    ref = nn.RMSNorm(E, eps=1e-5).double()
    ref.load_state_dict(ours.state_dict())
    for a, b in zip(_values_and_grads(ours, x, grad_out), _values_and_grads(ref, x, grad_out)):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_norms_catch_the_unbiased_variance_and_are_invariant():
    x, _, _ = _inputs(2)
    ln, rms = LayerNorm(E).double(), RMSNorm(E).double()
    with torch.no_grad():
        unbiased = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, keepdim=True) + 1e-5)
        assert (ln(x) - unbiased).abs().max() > 1e-3                       # E - 1 is a different function
        assert torch.allclose(ln(4 * x + 3), ln(x), atol=1e-5)             # shift and scale invariant
        assert torch.allclose(rms(4 * x), rms(x), atol=1e-5)               # scale invariant
        assert (rms(x + 3) - rms(x)).abs().max() > 0.1                     # but not shift invariant


@pytest.mark.parametrize("norm, by_hand", [(LayerNorm, layer_norm_input_grad), (RMSNorm, rms_norm_input_grad)])
def test_hand_written_input_gradients_equal_autograd(norm, by_hand):
    x, grad_out, g = _inputs(3)
    module = norm(E).double()
    with torch.no_grad():
        module.weight.copy_(1 + 0.5 * torch.randn(E, generator=g))
    want = _values_and_grads(module, x, grad_out)[1]
    assert torch.allclose(by_hand(x, module.weight.detach(), grad_out), want, atol=1e-12, rtol=0)
    # the sum over features vanishes for LayerNorm (eq. 2) and not for RMSNorm (eq. 4)
    total = want.sum(-1).abs().max()
    assert (total < 1e-12) if norm is LayerNorm else (total > 1e-3)


TINY = GPTConfig(vocab_size=23, block_size=10, n_layer=3, n_head=2, n_embd=16)


@pytest.mark.parametrize("options", [{}, dict(norm_position="post"), dict(residual=False), dict(norm="none"),
                                     dict(norm="rmsnorm", pos_encoding="rope", mlp="swiglu")])
def test_layer_stats_equal_a_forward_written_out(options):
    torch.manual_seed(0)
    model = GPT(replace(TINY, **options)).train()
    x = torch.randint(0, 23, (4, 10), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, 1)
    stats = layer_stats(model, x, y)
    assert model.training and all(p.grad is None for p in model.parameters())   # mode restored, grads cleared
    assert len(stats["act_std"]) == len(stats["grad_rms"]) == 4 and len(stats["param_grad_norm"]) == 3
    assert max(abs(a - b) for a, b in zip(stats["act_std"], residual_stream_std(model, x))) < 1e-6
    # the same numbers from a forward pass written out block by block, and torch.autograd.grad
    t = model.transformer
    h = t.wte(x) + (t.wpe(torch.arange(10)) if "wpe" in t else 0)
    rope = None
    if "wpe" not in t:
        from groundup.gpt import rope_cos_sin
        rope = rope_cos_sin(10, TINY.n_embd // TINY.n_head)
    streams = [h]
    for block in t.h:
        streams.append(block(streams[-1], rope))
    loss = F.cross_entropy(model.lm_head(t.ln_f(streams[-1])).flatten(0, 1), y.flatten())
    assert abs(loss.item() - stats["loss"]) < 1e-6
    grads = torch.autograd.grad(loss, streams + list(model.parameters()))
    for got, g in zip(stats["grad_rms"], grads[:4]):
        assert math.isclose(got, g.pow(2).sum(-1).mean().sqrt().item(), rel_tol=1e-5, abs_tol=1e-9)
    by_param = dict(zip((id(p) for p in model.parameters()), grads[4:]))
    for got, block in zip(stats["param_grad_norm"], t.h):
        want = math.sqrt(sum(by_param[id(p)].pow(2).sum().item() for p in block.parameters()))
        assert math.isclose(got, want, rel_tol=1e-5)


def test_mean_std_and_separated():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)                          # sample std: divided by n - 1
    assert mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([1.0, float("nan")]))
    with pytest.raises(ValueError):
        mean_std([])
    assert separated([1.0, 1.1, 0.9], [1.3, 1.4, 1.2])                     # |diff| 0.3 > 0.1 + 0.1
    assert not separated([1.0, 1.1, 0.9], [1.15, 1.25, 1.05])               # 0.15 < 0.2: the intervals overlap
    assert separated([1.0, 1.1, 0.9], [1.0, float("inf"), 1.0])            # a diverged run vs a finite one
    assert not separated([float("nan")] * 3, [float("inf")] * 3)            # two diverged ones
    assert separated([1.0, 1.1, 0.9], [1.3, 1.4, 1.2]) == separated([1.3, 1.4, 1.2], [1.0, 1.1, 0.9])
