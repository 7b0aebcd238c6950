"""Tests of the code chapter 07 exports (lib/groundup/gpt.py)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import Crash, crashing_progress

from groundup.attention import MultiHeadAttention
from groundup.gpt import (GPT, MLP, Block, CausalSelfAttention, GPTConfig, KVCache, apply_rope, char_dataset,
                          from_hf_gpt2, gelu_tanh, get_lm_batch, hf_gpt2_config, init_weights_, make_optimizer,
                          next_token, rope_cos_sin, split_text, to_hf_gpt2, weight_decay_groups)
from groundup.train import evaluate, train, warmup_cosine_lr


def evaluate_lm(model, data, *, block_size, batch_size, batches, seed=0):
    """Chapter 07's validation: fixed random windows, the book's evaluate."""
    return evaluate(model, [get_lm_batch(data, block_size, batch_size, i, seed) for i in range(batches)])


def train_gpt(model, train_data, val_data, *, steps, batch_size, lr, warmup=0, weight_decay=0.1, grad_clip=1.0,
              eval_every=100, eval_batches=20, seed=0, checkpoint=None, precision="auto"):
    """Chapter 07's run: the book's loop configured as the notebook configures it."""
    T = model.config.block_size
    return train(model, lambda step: get_lm_batch(train_data, T, batch_size, step, seed), steps=steps,
                 optimizer=make_optimizer(model, lr=lr, weight_decay=weight_decay),
                 lr_at=lambda step: warmup_cosine_lr(step, steps=steps, lr=lr, min_lr=lr / 10, warmup=warmup),
                 evaluate=lambda m: evaluate_lm(m, val_data, block_size=T, batch_size=batch_size,
                                                batches=eval_batches),
                 eval_every=eval_every, grad_clip=grad_clip, checkpoint=checkpoint, precision=precision)

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
    assert model.num_params() == n - 12 * 16 - 23 * 16                  # Kaplan's N: wpe and wte out
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
    model.forward = lambda idx, targets=None, **kw: (z.expand(idx.shape[0], idx.shape[1], -1), None)
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
    lrs = [warmup_cosine_lr(t, steps=200, lr=1.0, min_lr=0.1, warmup=20) for t in range(200)]
    assert lrs[0] == pytest.approx(0.05) and lrs[19] == pytest.approx(1.0)
    assert lrs[20] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:]))
    assert warmup_cosine_lr(110, steps=200, lr=1.0, min_lr=0.0, warmup=20) == pytest.approx(0.5)


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
    assert h["tokens_per_s"] > 0 and [s for s, _ in h["lr"]] == list(range(60))


def test_train_gpt_resumes_exactly(tmp_path, monkeypatch):
    """A run killed mid-way resumes from its last checkpoint and ends exactly where an uninterrupted run
    does, dropout randomness included."""
    import groundup.train as loop

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 23, (400,), generator=g)
    val = torch.randint(0, 23, (100,), generator=g)
    config = GPTConfig(vocab_size=23, block_size=12, n_layer=2, n_head=2, n_embd=16, dropout=0.2)
    kw = dict(steps=24, batch_size=4, lr=3e-3, warmup=3, eval_every=8, eval_batches=2, seed=1)

    torch.manual_seed(0)
    straight = GPT(config)
    h1 = train_gpt(straight, train, val, **kw)

    ckpt = tmp_path / "gpt.safetensors"
    monkeypatch.setattr(loop, "progress", crashing_progress(13))
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
    assert h1["train"] == h2["train"] and h1["val"] == h2["val"] and h1["grad_norm"] == h2["grad_norm"]
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


# ---- the options of GPTConfig, generation with a KV cache, top-p, RoPE, dtypes, device-side batches ----

def _old_gpt2_init(model: GPT) -> None:
    """Chapter 07's initialization before GPTConfig had options, verbatim: the defaults must reproduce it."""
    def init(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    model.apply(init)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * model.config.n_layer))


def test_default_config_is_the_old_model_bit_for_bit(monkeypatch):
    """Same parameter names and shapes, and with the same seed the same initial weights as before the options."""
    import groundup.gpt as gpt
    torch.manual_seed(0)
    new = GPT(TINY)
    monkeypatch.setattr(gpt, "init_weights_", lambda model, *args: model)    # the modules only, then the old init
    torch.manual_seed(0)
    old = GPT(TINY)
    _old_gpt2_init(old)
    assert list(new.state_dict()) == list(old.state_dict())
    for (k, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), k


OPTIONS = [dict(norm="rmsnorm"), dict(norm="none"), dict(norm_position="post"), dict(residual=False),
           dict(init="gpt2_unscaled"), dict(init="pytorch"), dict(init="unit"), dict(pos_encoding="rope"),
           dict(mlp="swiglu"), dict(bias=False), dict(dropout=0.1), dict(attn_dropout=0.2, embd_dropout=0.0),
           dict(sdpa=False), dict(pos_encoding="rope", mlp="swiglu", norm="rmsnorm", bias=False)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_each_option_builds_and_trains_a_step(options):
    config = GPTConfig(**{**TINY.__dict__, **options})
    torch.manual_seed(0)
    model = GPT(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _pattern_data(300, 1)
    h = train(model, lambda step: get_lm_batch(data, 12, 4, step, 0), steps=2, grad_clip=1.0,
              optimizer=make_optimizer(model, lr=1e-3, weight_decay=0.1), lr_at=lambda step: 1e-3)
    assert all(math.isfinite(v) for _, v in h["train"])
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items() if v.is_floating_point())
    greedy = model.generate(torch.zeros(2, 3, dtype=torch.long), 14, temperature=0)
    assert torch.equal(greedy, model.generate(torch.zeros(2, 3, dtype=torch.long), 14, temperature=0,
                                              use_cache=False))


def test_option_structure():
    n = lambda **o: GPT(GPTConfig(**{**TINY.__dict__, **o})).num_params(non_embedding=False)   # noqa: E731
    base = n()
    assert base - n(norm="none") == (2 * 2 + 1) * 2 * 16                  # 5 LayerNorms of weight and bias
    assert base - n(norm="rmsnorm") == 5 * 16                             # RMSNorm: a gain, no shift
    assert base - n(pos_encoding="rope") == 12 * 16                       # no wpe
    assert n(norm_position="post") == base - 2 * 16                       # post-LN: no final LayerNorm
    rope = GPT(GPTConfig(**{**TINY.__dict__, "pos_encoding": "rope"}))
    assert "wpe" not in rope.transformer and rope.num_params() == rope.num_params(False) - 23 * 16
    assert GPTConfig(n_embd=48, n_head=4, mlp="swiglu").mlp_hidden == 128
    torch.manual_seed(0)
    unit = GPT(GPTConfig(**{**TINY.__dict__, "init": "unit"}))
    assert 0.9 < unit.transformer.h[0].mlp.c_fc.weight.std() < 1.1
    unscaled = GPT(GPTConfig(**{**TINY.__dict__, "n_layer": 8, "init": "gpt2_unscaled"}))
    scaled = GPT(GPTConfig(**{**TINY.__dict__, "n_layer": 8}))
    ratio = unscaled.transformer.h[0].mlp.c_proj.weight.std() / scaled.transformer.h[0].mlp.c_proj.weight.std()
    assert 3.2 < ratio < 4.8                                              # sqrt(2 L) = 4
    with pytest.raises(ValueError, match="norm"):
        GPTConfig(norm="batchnorm")
    for bad in (dict(norm="rmsnorm"), dict(pos_encoding="rope"), dict(mlp="swiglu"), dict(norm_position="post")):
        with pytest.raises(ValueError, match="GPT-2 has no counterpart"):
            to_hf_gpt2(GPT(GPTConfig(**{**TINY.__dict__, **bad})))


def test_post_ln_and_no_residual_compute_what_they_say():
    torch.manual_seed(0)
    post = GPT(GPTConfig(**{**TINY.__dict__, "norm_position": "post"})).eval()
    block = post.transformer.h[0]
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        h = block.ln_1(x + block.attn(x))
        assert torch.allclose(block(x), block.ln_2(h + block.mlp(h)), atol=1e-6)
        plain = GPT(GPTConfig(**{**TINY.__dict__, "residual": False})).eval().transformer.h[0]
        assert torch.allclose(plain(x), plain.mlp(plain.ln_2(plain.attn(plain.ln_1(x)))), atol=1e-6)


def test_rope_equals_transformers_llama_rotary_embedding():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    B, H, T, d = 2, 3, 7, 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, T, d, generator=g, dtype=torch.float64), torch.randn(B, H, T, d, generator=g,
                                                                                  dtype=torch.float64)
    rot = LlamaRotaryEmbedding(LlamaConfig(hidden_size=H * d, num_attention_heads=H, rope_theta=500.0,
                                           max_position_embeddings=64))
    offset = 5
    positions = torch.arange(offset, offset + T)[None].expand(B, -1)
    cos_hf, sin_hf = rot(q.float(), positions)                           # (B, T, d)
    cos, sin = rope_cos_sin(T, d, theta=500.0, offset=offset)
    assert torch.allclose(cos, cos_hf[0], atol=1e-6) and torch.allclose(sin, sin_hf[0], atol=1e-6)
    cos, sin = rope_cos_sin(T, d, theta=500.0, offset=offset, dtype=torch.float64)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos_hf.double(), sin_hf.double())
    assert torch.allclose(apply_rope(q, cos, sin), q_hf, atol=1e-6)
    assert torch.allclose(apply_rope(k, cos, sin), k_hf, atol=1e-6)
    # the point of RoPE: q_m . k_n depends on m - n only
    c1, s1 = rope_cos_sin(10, d, offset=0, dtype=torch.float64)
    c2, s2 = rope_cos_sin(10, d, offset=13, dtype=torch.float64)
    v, w = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    dot = lambda c, s: (apply_rope(v, c[7], s[7]) * apply_rope(w, c[2], s[2])).sum()   # noqa: E731
    assert torch.allclose(dot(c1, s1), dot(c2, s2), atol=1e-12)


@pytest.mark.parametrize("options", [{}, dict(pos_encoding="rope"), dict(sdpa=False)])
def test_kv_cache_generation_equals_uncached(options):
    """Greedy and sampled (same generator), also past block_size where the window slides."""
    model = perturbed(GPTConfig(**{**TINY.__dict__, **options}), seed=4)
    prompt = torch.randint(0, 23, (3, 5), generator=torch.Generator().manual_seed(2))
    for setting in (dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8, top_k=5),
                    dict(temperature=1.2, top_p=0.7)):
        for n in (6, 20):                                                 # 5 + 20 > block_size 12: cropped
            a = model.generate(prompt, n, generator=torch.Generator().manual_seed(9), **setting)
            b = model.generate(prompt, n, use_cache=False, generator=torch.Generator().manual_seed(9), **setting)
            assert torch.equal(a, b), (setting, n)
    idx = torch.randint(0, 23, (2, 12))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(model.config.n_layer)
        first = model(idx[:, :4], cache=cache)[0]                          # a prompt, then a chunk, then tokens
        chunk = model(idx[:, 4:9], cache=cache)[0]
        rest = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(9, 12)]
        assert torch.allclose(torch.cat([first, chunk, *rest], dim=1), full, atol=1e-5)
        assert torch.allclose(model(idx, last_only=True)[0], full[:, -1:], atol=1e-6)
        with pytest.raises(ValueError, match="last_only"):
            model(idx, idx, last_only=True)
        with pytest.raises(ValueError, match="block_size"):
            model(idx[:, :1], cache=cache)


def test_generation_computes_only_the_last_positions_logits():
    model = perturbed(GPTConfig(vocab_size=23, block_size=64, n_layer=1, n_head=2, n_embd=16), seed=0)
    rows = []
    model.lm_head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    for use_cache in (True, False):
        rows.clear()
        model.generate(torch.zeros(1, 30, dtype=torch.long), 5, temperature=0, use_cache=use_cache)
        assert rows == [1] * 5                                           # one position per step, never 30


def test_top_p_equals_transformers_top_p_warper():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    for top_p in (0.1, 0.5, 0.9, 0.999):
        for top_k in (None, 10):
            ref = logits / 0.7
            if top_k is not None:
                ref = TopKLogitsWarper(top_k)(None, ref)
            ref = TopPLogitsWarper(top_p)(None, ref)
            keep_ref = torch.isfinite(ref)
            # which tokens next_token can draw: 4,000 draws per row must land in HF's kept set and cover it
            draws = torch.stack([next_token(logits, 0.7, top_k=top_k, top_p=top_p,
                                            generator=torch.Generator().manual_seed(s)) for s in range(400)], 0)
            drawn = torch.zeros_like(keep_ref)
            drawn.scatter_(1, draws.squeeze(-1).T, True)
            assert not (drawn & ~keep_ref).any(), (top_p, top_k)
            small = keep_ref.sum(-1) <= 3                                # small nuclei are covered by 400 draws
            assert torch.equal(drawn[small], keep_ref[small]), (top_p, top_k)
    z = torch.tensor([[3.0, 2.9, -1.0, -2.0]])
    assert next_token(z, 1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0)).item() == 0   # p -> 0: greedy
    with pytest.raises(ValueError):
        next_token(z, 1.0, top_p=0.0)


def test_hf_round_trip_keeps_float64():
    ours = perturbed(TINY, seed=6).double()
    hf = to_hf_gpt2(ours)
    assert all(p.dtype == torch.float64 for p in hf.parameters())
    back = from_hf_gpt2(hf)
    assert all(p.dtype == torch.float64 for p in back.parameters())
    for a, b in zip(ours.state_dict().values(), back.state_dict().values()):
        assert torch.equal(a, b)
    idx = torch.randint(0, 23, (2, 12))
    with torch.no_grad():
        assert rel_err(ours(idx)[0], hf.eval()(idx).logits) <= 1e-12         # float64 all the way


def test_batch_indices_are_made_on_the_data_device():
    """No index tensor is built on the host and copied: every tensor get_lm_batch makes is on data.device.
    (On the CPU a copy would be a no-op, so we watch the operators: no aten::to / _to_copy / copy_.)"""
    from torch.profiler import ProfilerActivity, profile
    data = torch.arange(500)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        get_lm_batch(data, 12, 4, 3, 0)
    names = {e.key for e in prof.key_averages()}
    assert not names & {"aten::to", "aten::_to_copy", "aten::copy_"}, names
    x, y = get_lm_batch(data, 12, 4, 3, 0)
    assert torch.equal(y, x + 1)


def test_weight_decay_groups_and_the_decay_embeddings_option():
    model = GPT(TINY)
    decay, no_decay = weight_decay_groups(model, 0.1)                     # nanoGPT's: embeddings decayed
    assert "transformer.wte.weight" in decay["names"] and "transformer.wpe.weight" in decay["names"]
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    decay, no_decay = weight_decay_groups(model, 0.1, decay_embeddings=False)   # minGPT's (chapter 09)
    assert "transformer.wte.weight" in no_decay["names"] and "transformer.wpe.weight" in no_decay["names"]
    assert "lm_head.weight" not in decay["names"]                         # tied: the embedding rule wins
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), decay_embeddings=False)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params(non_embedding=False)


def test_init_weights_overwrites_everything():
    model = GPT(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    init_weights_(model, "gpt2")
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif ".ln_" in name:
            assert torch.all(p == 1), name
        else:
            assert p.std() < 0.05, name
