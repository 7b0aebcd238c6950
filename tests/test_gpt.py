"""Tests of the code chapter 07 exports (lib/groundup/gpt.py)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import Crash, crashing_progress

from groundup.attention import MultiHeadAttention
from groundup.gpt import (GPT, MLP, Block, CausalSelfAttention, GPTConfig, char_dataset, evaluate_lm, from_hf_gpt2,
                          gelu_tanh, get_lm_batch, hf_gpt2_config, lr_at, make_optimizer, split_text, to_hf_gpt2,
                          train_gpt)

TINY = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread


def perturbed(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_split_and_char_dataset():
    text = "abcdefghij" * 10
    train, val = split_text(text, 0.1)
    assert train + val == text and len(val) == 10
    tr, va, vocab = char_dataset("hello world, hello!", val_fraction=0.25)
    assert vocab == sorted(set("hello world, hello!"))
    assert len(tr) + len(va) == len("hello world, hello!") and tr.dtype == torch.long
    with pytest.raises(ValueError):
        split_text(text, 1.0)


def test_get_lm_batch_targets_shifted_and_pure():
    data = torch.arange(100)
    for step in range(5):
        x, y = get_lm_batch(data, block_size=10, batch_size=6, step=step, seed=3)
        assert x.shape == y.shape == (6, 10)
        assert torch.equal(y, x + 1)                                 # next token (data = arange)
        assert int(y.max()) <= 99
        assert torch.equal(get_lm_batch(data, 10, 6, step, 3)[0], x)
    assert not torch.equal(get_lm_batch(data, 10, 6, 0, 3)[0], get_lm_batch(data, 10, 6, 0, 4)[0])
    starts = torch.cat([get_lm_batch(data, 10, 64, s, 0)[0][:, 0] for s in range(20)])
    assert int(starts.min()) == 0 and int(starts.max()) == 89          # every start reachable, none past the end
    with pytest.raises(ValueError):
        get_lm_batch(torch.arange(10), 10, 2, 0, 0)


def test_config_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)


def test_attention_sdpa_equals_chapter05_and_multihead():
    torch.manual_seed(0)
    attn = CausalSelfAttention(TINY)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(3, 12, 16)
    a = attn(x)
    attn.sdpa = False
    b = attn(x)
    mha = MultiHeadAttention(16, 2)
    mha.load_state_dict({"in_proj_weight": attn.c_attn.weight, "in_proj_bias": attn.c_attn.bias,
                         "out_proj.weight": attn.c_proj.weight, "out_proj.bias": attn.c_proj.bias})
    c, _ = mha(x, x, x, is_causal=True)
    assert (a - b).abs().max() < 1e-5 and (a - c).abs().max() < 1e-5


def test_causality_of_the_whole_model():
    model = perturbed(TINY)
    idx = torch.randint(0, 23, (2, 12))
    idx2 = idx.clone()
    idx2[:, 7] = (idx2[:, 7] + 1) % 23
    with torch.no_grad():
        d = (model(idx)[0] - model(idx2)[0]).abs().amax(dim=(0, 2))
    assert torch.all(d[:7] == 0) and torch.all(d[7:] > 1e-4)


def test_gelu_matches_hf_gelu_new():
    from transformers.activations import NewGELUActivation
    z = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    assert (gelu_tanh(z) - NewGELUActivation()(z)).abs().max() < 1e-12
    assert (gelu_tanh(z) - F.gelu(z, approximate="tanh")).abs().max() < 1e-12
    assert (gelu_tanh(z) - F.gelu(z)).abs().max() > 1e-5               # not the exact GELU
    mlp = MLP(TINY)
    assert mlp(torch.randn(2, 3, 16)).shape == (2, 3, 16)
    assert Block(TINY)(torch.randn(2, 3, 16)).shape == (2, 3, 16)


def test_gpt_shapes_tying_loss_and_params():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx, targets = torch.randint(0, 23, (4, 12)), torch.randint(0, 23, (4, 12))
    logits, loss = model(idx, targets)
    assert logits.shape == (4, 12, 23) and loss.ndim == 0
    assert model(idx)[1] is None
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    assert abs(loss.item() - math.log(23)) < 0.1                        # near-uniform at initialization
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == n
    assert model.num_params() == n - 12 * 16
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(4)) < 0.01                       # GPT-2's residual scaling
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 13, dtype=torch.long))


@pytest.mark.parametrize("bias", [True, False])
def test_to_hf_gpt2_same_logits_and_loss(bias):
    ours = perturbed(GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16, bias=bias), seed=1)
    hf = to_hf_gpt2(ours).eval()
    idx = torch.randint(0, 23, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], hf(idx).logits) <= 1e-5
        out = hf(idx, labels=idx)
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    assert abs(out.loss.item() - loss.item()) < 1e-5
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    # Conv1D layout: transposed
    assert torch.equal(hf.transformer.h[0].mlp.c_fc.weight, ours.transformer.h[0].mlp.c_fc.weight.t())


def test_from_hf_gpt2_same_logits_on_hf_initialized_model():
    from transformers import GPT2LMHeadModel
    torch.manual_seed(5)
    hf = GPT2LMHeadModel(hf_gpt2_config(TINY)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = from_hf_gpt2(hf).eval()
    idx = torch.randint(0, 23, (3, 12))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], hf(idx).logits) <= 1e-5
    # round trip is exact
    again = to_hf_gpt2(ours)
    for (k, a), (k2, b) in zip(hf.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_mapping_check_can_fail():
    """Not transposing the square attention projection breaks the equality."""
    ours = perturbed(TINY, seed=2)
    hf = to_hf_gpt2(ours).eval()
    with torch.no_grad():
        w = hf.transformer.h[1].attn.c_proj.weight
        w.copy_(w.t().clone())
        idx = torch.randint(0, 23, (2, 12))
        assert rel_err(ours(idx)[0], hf(idx).logits) > 1e-4


def test_from_hf_gpt2_rejects_unsupported_options():
    from transformers import GPT2LMHeadModel
    config = hf_gpt2_config(TINY)
    config.activation_function = "relu"
    with pytest.raises(ValueError, match="activation_function"):
        from_hf_gpt2(GPT2LMHeadModel(config))


def test_generate_top1_is_greedy_and_reproducible():
    model = perturbed(TINY, seed=3)
    prompt = torch.randint(0, 23, (2, 4))
    greedy = model.generate(prompt, 15, temperature=0)
    assert greedy.shape == (2, 19) and torch.equal(greedy[:, :4], prompt)
    top1 = model.generate(prompt, 15, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, top1)
    with torch.no_grad():
        assert torch.equal(model(greedy[:, :12])[0][:, 3:].argmax(-1), greedy[:, 4:13])
    a = model.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 10, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    model.train()
    model.generate(prompt, 2)
    assert model.training                                               # the mode is restored
    with pytest.raises(ValueError):
        model.generate(prompt, 2, top_k=0)


def test_generate_top_k_draws_only_top_k_with_softmax_probabilities():
    """Eq. (12) on fixed logits whose top three differ enough that a forgotten temperature, or top-k not
    applied, moves the frequencies far outside the tolerance."""
    model = GPT(TINY).eval()
    z = torch.cat([torch.tensor([2.0, 1.0, 0.5]), torch.linspace(0.0, -2.0, TINY.vocab_size - 3)])   # top 3: 0, 1, 2
    model.forward = lambda idx, targets=None: (z.expand(idx.shape[0], idx.shape[1], -1), None)
    prompt = torch.zeros(20_000, 1, dtype=torch.long)
    draws = model.generate(prompt, 1, temperature=0.7, top_k=3, generator=torch.Generator().manual_seed(0))[:, -1]
    assert set(draws.tolist()) <= {0, 1, 2}
    expected = torch.softmax(z[:3] / 0.7, 0)
    observed = torch.stack([(draws == c).float().mean() for c in range(3)])
    tol = 0.015                                                         # ~4 standard deviations at 20,000 draws
    assert (observed - expected).abs().max() < tol
    assert (torch.softmax(z[:3], 0) - expected).abs().max() > 2 * tol   # temperature ignored: would fail
    assert (torch.softmax(z / 0.7, 0)[:3] - expected).abs().max() > 2 * tol   # top-k ignored: would fail


def test_lr_schedule():
    lrs = [lr_at(t, steps=200, lr=1.0, warmup=20) for t in range(200)]
    assert lrs[0] == pytest.approx(0.05) and lrs[19] == pytest.approx(1.0)
    assert lrs[20] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:]))
    assert lr_at(110, steps=200, lr=1.0, min_lr=0.0, warmup=20) == pytest.approx(0.5)


def test_optimizer_groups():
    model = GPT(TINY)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params(non_embedding=False)


def test_evaluate_lm_uniform_model_is_log_vocab():
    model = GPT(TINY)
    with torch.no_grad():
        model.transformer.wte.weight.zero_()                            # tied: zero logits
    data = torch.randint(0, 23, (300,), generator=torch.Generator().manual_seed(0))
    assert abs(evaluate_lm(model, data, block_size=12, batch_size=4, batches=3) - math.log(23)) < 1e-5
    model.train()
    evaluate_lm(model, data, block_size=12, batch_size=4, batches=1)
    assert model.training


def _pattern_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 23, (7,), generator=g)
    return base.repeat(n // 7 + 1)[:n]


def test_training_learns_a_repeating_pattern():
    torch.manual_seed(0)
    data = _pattern_data(700, 0)
    model = GPT(TINY)
    before = evaluate_lm(model, data, block_size=12, batch_size=8, batches=4)
    h = train_gpt(model, data, data, steps=60, batch_size=8, lr=1e-2, warmup=5, eval_every=30, eval_batches=4)
    assert h["val"][-1][1] < 0.3 * before
    assert [s for s, _ in h["train"]] == list(range(60)) and [s for s, _ in h["val"]] == [30, 60]
    assert h["tokens_per_s"] > 0 and h["steps"] == 60


def test_train_gpt_resumes_exactly(tmp_path, monkeypatch):
    """A run killed mid-way resumes from its last checkpoint and ends exactly where an uninterrupted run
    does, dropout randomness included."""
    import groundup.gpt as gpt

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 23, (400,), generator=g)
    val = torch.randint(0, 23, (100,), generator=g)
    config = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16, dropout=0.2)
    kw = dict(steps=24, batch_size=4, lr=3e-3, warmup=3, eval_every=8, eval_batches=2, seed=1)

    torch.manual_seed(0)
    straight = GPT(config)
    h1 = train_gpt(straight, train, val, **kw)

    ckpt = tmp_path / "gpt.safetensors"
    monkeypatch.setattr(gpt, "progress", crashing_progress(13))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_gpt(GPT(config), train, val, **kw, checkpoint=ckpt)
    monkeypatch.undo()
    assert ckpt.exists()
    torch.manual_seed(123)     # a different init and random state: everything must come from the checkpoint
    resumed = GPT(config)
    h2 = train_gpt(resumed, train, val, **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert h1["train"] == h2["train"] and h1["val"] == h2["val"]
    assert [s for s, _ in h1["train_seconds"]] == [s for s, _ in h2["train_seconds"]]


def test_chapter05_attention_path_with_dropout():
    """sdpa=False (chapter 05's attention) trains with attention dropout and equals SDPA in eval mode."""
    config = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16, dropout=0.3)
    torch.manual_seed(0)
    fused = GPT(config)
    ours = GPT(GPTConfig(**{**config.__dict__, "sdpa": False}))
    ours.load_state_dict(fused.state_dict())
    idx = torch.randint(0, 23, (2, 12))
    fused.eval(), ours.eval()
    with torch.no_grad():
        assert (fused(idx)[0] - ours(idx)[0]).abs().max() < 1e-5
    ours.train()
    a, b = ours(idx)[0], ours(idx)[0]
    assert torch.isfinite(a).all() and not torch.equal(a, b)          # dropout is active in training
