"""Tests of the code chapter 09 exports (lib/groundup/gpt_small.py)."""

import math

import pytest
import torch
import torch.nn as nn

from conftest import Crash, crashing_progress
from dataclasses import replace

from groundup.bpe import bits_per_char
from groundup.gpt import GPT, GPTConfig, get_lm_batch, init_weights_, make_optimizer, weight_decay_groups
from groundup.gpt_small import count_gpt_params, matmul_params, mfu, model_flops_per_token, peak_flops, residual_stream_std
from groundup.rnn import clip_grad_norm
from groundup.train import evaluate, train, warmup_cosine_lr


def train_gpt_small(model, train_data, val_data, *, steps, batch_size, max_lr, min_lr, warmup, weight_decay=0.1,
                    betas=(0.9, 0.95), grad_clip=1.0, grad_accum=1, eval_every=100, eval_batches=20, seed=0,
                    checkpoint=None, timing_skip=5):
    """Chapter 09's run: the book's loop configured as the notebook configures it."""
    T = model.config.block_size
    windows = [get_lm_batch(val_data, T, batch_size, i, seed) for i in range(eval_batches)]
    return train(model, lambda i: get_lm_batch(train_data, T, batch_size, i, seed), steps=steps,
                 optimizer=make_optimizer(model, lr=max_lr, weight_decay=weight_decay, betas=betas,
                                          decay_embeddings=False),
                 lr_at=lambda t: warmup_cosine_lr(t, steps=steps, lr=max_lr, min_lr=min_lr, warmup=warmup),
                 evaluate=lambda m: evaluate(m, windows), eval_every=eval_every, grad_clip=grad_clip,
                 grad_accum=grad_accum, checkpoint=checkpoint, timing_skip=timing_skip)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread


def tiny(n_layer=2, n_embd=32, vocab=50, block=16, dropout=0.0):
    return GPTConfig(vocab_size=vocab, block_size=block, n_layer=n_layer, n_head=4, n_embd=n_embd, dropout=dropout)


def test_param_count_formula_is_exact():
    for L, d, V, T in ((1, 8, 11, 5), (3, 32, 50, 16), (2, 64, 300, 40)):
        model = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=4, n_embd=d))
        assert sum(p.numel() for p in model.parameters()) == count_gpt_params(L, d, V, T)


def test_init_matches_hf_gpt2_and_scales_residual_projections():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = dict(GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=128, n_embd=128, n_layer=4, n_head=4,
                                         bos_token_id=0, eos_token_id=0)).named_parameters())
    model = GPT(GPTConfig(vocab_size=300, block_size=128, n_layer=4, n_head=4, n_embd=128))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)                                          # init_weights_ must overwrite everything
    torch.manual_seed(1)
    init_weights_(model, "gpt2")
    for name, p in model.named_parameters():
        if p.dim() == 2:
            assert abs(p.std().item() / hf[name].std().item() - 1) < 0.05, name
        else:
            assert torch.equal(p, hf[name]), name
    assert abs(model.transformer.h[2].mlp.c_proj.weight.std().item() - 0.02 / math.sqrt(8)) < 3e-4
    init_weights_(model, "gpt2_unscaled")
    assert abs(model.transformer.h[2].mlp.c_proj.weight.std().item() - 0.02) < 5e-4


def test_residual_stream_grows_with_depth_only_without_scaling():
    cfg = tiny(n_layer=16, n_embd=32, block=32)
    idx = torch.randint(0, 50, (8, 32), generator=torch.Generator().manual_seed(0))
    added = {}
    for scaled in (True, False):
        torch.manual_seed(2)
        stds = residual_stream_std(GPT(replace(cfg, init="gpt2" if scaled else "gpt2_unscaled")), idx)
        assert len(stds) == 17
        added[scaled] = stds[-1] ** 2 - stds[0] ** 2
    assert 16 < added[False] / added[True] < 64                  # eq. (5): about 2L = 32


def test_weight_decay_groups_partition_and_tied_embedding():
    model = GPT(tiny())
    decay, no_decay = weight_decay_groups(model, 0.1, decay_embeddings=False)
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert set(decay["names"]) == {n for n, p in model.named_parameters() if p.dim() == 2 and "wte" not in n
                                   and "wpe" not in n}
    assert "transformer.wte.weight" in no_decay["names"]        # tied to lm_head, still an embedding
    decay_e, _ = weight_decay_groups(model, 0.1, decay_embeddings=True)
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= set(decay_e["names"])
    # AdamW with these groups leaves a zero-gradient LayerNorm gain at 1 but decays a zero-gradient matrix
    lin, ln = nn.Linear(4, 4), nn.LayerNorm(4)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in weight_decay_groups(nn.Sequential(lin, ln), 0.5,
                                                                                          decay_embeddings=False)]
    opt = torch.optim.AdamW(groups, lr=0.1)
    before = lin.weight.detach().clone()
    for p in (*lin.parameters(), *ln.parameters()):
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(ln.weight, torch.ones(4)) and torch.allclose(lin.weight, before * (1 - 0.1 * 0.5))


def test_clip_grad_norm_on_gpt_matches_torch():
    torch.manual_seed(0)
    a, b = GPT(tiny()), GPT(tiny())
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 50, (3, 16))
    for m in (a, b):
        m(x, x)[1].backward()
    n1 = clip_grad_norm(list(a.parameters()), 0.05)
    n2 = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
    assert torch.allclose(n1, n2, rtol=1e-6) and n1 > 0.05
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-8)


def test_warmup_cosine_values_and_torch_schedulers():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, steps=110)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(0.1)
    assert warmup_cosine_lr(9, **kw) == pytest.approx(1.0)
    assert warmup_cosine_lr(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine_lr(60, **kw) == pytest.approx(0.55)
    assert warmup_cosine_lr(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine_lr(0, lr=1.0, min_lr=0.0, warmup=0, steps=10) == 1.0       # no warmup
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / 7, end_factor=1.0, total_iters=6),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50 - 7, eta_min=3e-4)], milestones=[7])
    for t in range(50):
        assert abs(opt.param_groups[0]["lr"] - warmup_cosine_lr(t, lr=3e-3, min_lr=3e-4, warmup=7, steps=50)) < 1e-12
        opt.step()
        sched.step()


def test_flops_formula_matches_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = tiny(n_layer=2, n_embd=64, vocab=100, block=32)
    model = GPT(cfg)
    x = torch.randint(0, 100, (2, 32))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    per_token = counter.get_total_flops() / 64
    assert per_token == model_flops_per_token(matmul_params(model), 2, 4, 16, 32)
    assert model_flops_per_token(10, 1, 1, 1, 1) == 72
    assert mfu(1e6, 1e8, 1e15) == pytest.approx(0.1) and mfu(1e6, 1e8, None) is None
    assert peak_flops("cpu") is None


def test_bits_per_char():
    assert bits_per_char(math.log(2), 10, 10) == pytest.approx(1.0)
    assert bits_per_char(2.0, 50, 100) == pytest.approx(1.0 / math.log(2))


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 50, (2000,), generator=g), torch.randint(0, 50, (500,), generator=g)


def test_training_reduces_loss_and_records_history():
    torch.manual_seed(0)
    text = torch.tensor([1, 2, 3, 4, 5, 6, 7] * 300)
    model = GPT(tiny())
    h = train_gpt_small(model, text, text, steps=40, batch_size=8, max_lr=1e-2, min_lr=1e-3, warmup=5,
                        eval_every=20, eval_batches=2, timing_skip=2)
    assert h["val"][-1][1] < 0.3 * math.log(50)
    assert [s for s, _ in h["train"]] == list(range(40)) and len(h["grad_norm"]) == len(h["lr"]) == 40
    assert h["lr"][0][1] == pytest.approx(2e-3) and h["tokens_per_s"] > 0


def test_train_gpt_small_resumes_exactly(tmp_path, monkeypatch):
    """Killed between checkpoints and resumed: same weights and history as an uninterrupted run, dropout included."""
    import groundup.train as loop
    train, val = _data()
    kw = dict(steps=12, batch_size=4, max_lr=3e-3, min_lr=3e-4, warmup=3, grad_accum=2, eval_every=4,
              eval_batches=2, seed=3, timing_skip=1)
    torch.manual_seed(0)
    straight = GPT(tiny(dropout=0.2))
    h1 = train_gpt_small(straight, train, val, **kw)

    ckpt = tmp_path / "gpt_small.safetensors"
    monkeypatch.setattr(loop, "progress", crashing_progress(10))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_gpt_small(GPT(tiny(dropout=0.2)), train, val, **kw, checkpoint=ckpt)
    monkeypatch.undo()
    torch.manual_seed(99)                                          # everything must come from the checkpoint
    resumed = GPT(tiny(dropout=0.2))
    h2 = train_gpt_small(resumed, train, val, **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for key in ("train", "val", "lr", "grad_norm"):
        assert h1[key] == h2[key], key
