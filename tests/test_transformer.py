"""Tests of the code chapter 06 exports (lib/groundup/transformer.py)."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import Crash, crashing_progress
from groundup.attention import padding_mask
from groundup.transformer import (BOS, EOS, FIRST_DIGIT, PAD, DecoderLayer, EncoderClassifier, EncoderLayer, FeedForward,
                                  Transformer, TransformerConfig, beam_search, exact_match, greedy_search,
                                  label_smoothed_cross_entropy, make_seq2seq_data, noam_lr, sinusoidal_positions,
                                  index_loss, paper_adam, smoothed_targets, torch_layer_state,
                                  transformer_log_probs)
from groundup.runtime import batch_indices
from groundup.train import train


def test_sinusoidal_positions_rotation_and_norm():
    pe = sinusoidal_positions(50, 16, dtype=torch.float64)
    assert pe.shape == (50, 16) and pe.dtype == torch.float64
    assert torch.allclose(pe[0, 0::2], torch.zeros(8, dtype=torch.float64)) and torch.allclose(pe[0, 1::2], torch.ones(8, dtype=torch.float64))
    assert torch.allclose(pe[7, 0], torch.tensor(math.sin(7.0), dtype=torch.float64))       # omega_0 = 1
    assert torch.allclose(pe.pow(2).sum(1), torch.full((50,), 8.0, dtype=torch.float64))
    for k in (1, 9):                                                                       # eq. (3): depends on k only
        dots = (pe[:-k] * pe[k:]).sum(1)
        assert torch.allclose(dots, dots[0].expand_as(dots), atol=1e-10)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_positions(10, 7)


def _perturb(module, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module.double().eval()


def _outputs_and_grads(module, run, inputs, grad_out):
    leaves = [t.clone().requires_grad_() for t in inputs]
    module.zero_grad()
    out = run(module, *leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves], {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch_float64(norm_first):
    theirs = _perturb(nn.TransformerEncoderLayer(24, 3, 40, dropout=0.0, batch_first=True, norm_first=norm_first), 0)
    ours = EncoderLayer(24, 3, 40, norm_first=norm_first).double().eval()
    ours.load_state_dict(torch_layer_state(theirs))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 6, 24, generator=g, dtype=torch.float64)
    keep = padding_mask(torch.tensor([6, 3, 1]), 6)
    grad_out = torch.randn(3, 6, 24, generator=g, dtype=torch.float64)
    o1, gx1, gp1 = _outputs_and_grads(ours, lambda m, x: m(x, keep), [x], grad_out)
    o2, gx2, gp2 = _outputs_and_grads(theirs, lambda m, x: m(x, src_key_padding_mask=~keep), [x], grad_out)
    assert (o1 - o2).abs().max() <= 1e-12 and (gx1[0] - gx2[0]).abs().max() <= 1e-12
    gp2 = dict(zip(torch_layer_state(theirs).keys(), gp2.values()))
    assert gp1.keys() == gp2.keys()
    assert max((gp1[k] - gp2[k]).abs().max().item() for k in gp1) <= 1e-12
    assert not torch.allclose(ours(x, None), o2, atol=1e-3)                                  # the mask matters


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch_float64(norm_first):
    theirs = _perturb(nn.TransformerDecoderLayer(24, 3, 40, dropout=0.0, batch_first=True, norm_first=norm_first), 2)
    ours = DecoderLayer(24, 3, 40, norm_first=norm_first).double().eval()
    ours.load_state_dict(torch_layer_state(theirs))
    g = torch.Generator().manual_seed(3)
    y, mem = torch.randn(2, 5, 24, generator=g, dtype=torch.float64), torch.randn(2, 7, 24, generator=g, dtype=torch.float64)
    keep = padding_mask(torch.tensor([7, 2]), 7)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    grad_out = torch.randn(2, 5, 24, generator=g, dtype=torch.float64)
    o1, g1, gp1 = _outputs_and_grads(ours, lambda m, y, mem: m(y, mem, None, keep), [y, mem], grad_out)
    o2, g2, gp2 = _outputs_and_grads(theirs, lambda m, y, mem: m(y, mem, tgt_mask=causal, tgt_is_causal=True,
                                                                   memory_key_padding_mask=~keep), [y, mem], grad_out)
    assert (o1 - o2).abs().max() <= 1e-12
    assert all((a - b).abs().max() <= 1e-12 for a, b in zip(g1, g2))
    gp2 = dict(zip(torch_layer_state(theirs).keys(), gp2.values()))
    assert max((gp1[k] - gp2[k]).abs().max().item() for k in gp1) <= 1e-12
    y2 = y.clone()
    y2[:, 3:] += 1.0                                                                        # change the future
    with torch.no_grad():
        assert torch.allclose(ours(y, mem, None, keep)[:, :3], ours(y2, mem, None, keep)[:, :3], atol=1e-12)


def test_feed_forward_is_position_wise():
    ff = FeedForward(8, 16)
    x = torch.randn(2, 5, 8)
    assert torch.allclose(ff(x)[:, 2], ff(x[:, 2:3])[:, 0], atol=1e-6)


def test_transformer_shapes_tying_padding_and_errors():
    cfg = TransformerConfig(src_vocab=13, tgt_vocab=13, d_model=16, n_heads=2, d_ff=32, dropout=0.0, max_len=8)
    model = Transformer(cfg).eval()
    src = torch.tensor([[4, 5, 2, 0, 0], [3, 4, 5, 6, 2]])
    tgt = torch.tensor([[1, 5, 4], [1, 6, 5]])
    logits = model(src, tgt)
    assert logits.shape == (2, 3, 13)
    assert model.generator.weight is model.src_embed.weight
    junk = src.clone()
    junk[0, 3:] = torch.tensor([7, 8])
    with torch.no_grad():
        assert torch.allclose(model(junk, tgt, src_keep=src != 0), logits, atol=1e-5)
        assert not torch.allclose(model(junk, tgt), logits, atol=1e-5)                     # unmasked, it leaks
    untied = Transformer(TransformerConfig(**{**vars(cfg), "share_embeddings": False, "tie_output": False}))
    assert untied.num_params() - model.num_params() == 2 * 13 * 16
    with pytest.raises(ValueError, match="share_embeddings"):
        Transformer(TransformerConfig(src_vocab=10, tgt_vocab=12))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 9, dtype=torch.long), tgt[:1])


def test_label_smoothing_matches_torch_in_both_conventions():
    g = torch.Generator().manual_seed(0)
    K, eps = 11, 0.2
    z = torch.randn(30, K, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randint(0, K, (30,), generator=g)
    c[::5] = 0
    ours = label_smoothed_cross_entropy(z, c, eps, ignore_index=0)
    ref = F.cross_entropy(z, c, label_smoothing=eps, ignore_index=0)
    assert abs(ours - ref).item() <= 1e-12
    ga, = torch.autograd.grad(ours, z)
    gb, = torch.autograd.grad(ref, z)
    assert (ga - gb).abs().max() <= 1e-12
    others = label_smoothed_cross_entropy(z, c, eps, spread="others", ignore_index=0)
    assert abs(others - F.cross_entropy(z, c, label_smoothing=eps * K / (K - 1), ignore_index=0)).item() <= 1e-12
    assert abs(others - ref).item() > 1e-4
    q = smoothed_targets(c, K, eps, "others", dtype=torch.float64)
    assert torch.allclose(q.sum(1), torch.ones(30, dtype=torch.float64)) and torch.allclose(q[0, c[0]], torch.tensor(1 - eps, dtype=torch.float64))
    with pytest.raises(ValueError, match="spread"):
        label_smoothed_cross_entropy(z, c, eps, spread="uniform")


def test_noam_schedule():
    assert math.isclose(noam_lr(3999, 512, 4000), (512 * 4000) ** -0.5)
    assert max(range(10_000), key=lambda s: noam_lr(s, 512, 4000)) == 3999
    assert math.isclose(noam_lr(0, 64, 100, factor=2.0), 2 * 64 ** -0.5 * 100 ** -1.5)


def _table_model(table):
    return lambda tokens, rows: torch.stack([torch.tensor(table[int(t)]).log() for t in tokens[:, -1]])


def test_beam_search_beats_greedy_on_the_toy_and_width_one_is_greedy():
    toy = _table_model({BOS: [0, 0, 0.1, 0.5, 0.4], 3: [0, 0, 1 / 3, 1 / 3, 1 / 3], 4: [0, 0, 0.9, 0.05, 0.05],
                        EOS: [1.0, 0, 0, 0, 0]})
    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=3)
    g_tok, g_lp = greedy_search(toy, 1, **kw)
    b_tok, b_lp = beam_search(toy, 1, beam_size=2, **kw)
    assert g_tok[0, 0] == 3 and b_tok.tolist()[0][:2] == [4, 2] and math.isclose(b_lp.item(), math.log(0.36), rel_tol=1e-6)
    assert b_tok[0, 2] == PAD                                                              # padded after EOS
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab=13, tgt_vocab=13, d_model=16, n_heads=2, d_ff=32, dropout=0.0, max_len=10)).eval()
    src, _ = make_seq2seq_data(6, 1, 5, seed=0)
    scorer = transformer_log_probs(model, src)
    kw = dict(bos=BOS, eos=EOS, pad=PAD, max_len=6)
    g_tok, g_lp = greedy_search(scorer, 6, **kw)
    b_tok, b_lp = beam_search(scorer, 6, beam_size=1, alpha=0.6, **kw)
    assert torch.equal(g_tok, b_tok) and torch.allclose(g_lp, b_lp, atol=1e-5)
    # greedy's log p is what the model assigns to its output, eq. (14)
    tgt_in = torch.cat([torch.full((6, 1), BOS), g_tok[:, :-1]], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(src, tgt_in), -1).gather(-1, g_tok[..., None]).squeeze(-1)
    real = torch.cat([torch.ones(6, 1, dtype=torch.bool), (g_tok[:, :-1] != EOS).cumprod(1).bool()], 1) & (g_tok != PAD)
    assert torch.allclose((logp * real).sum(1), g_lp, atol=1e-4)


def test_make_seq2seq_data_and_exact_match():
    src, tgt = make_seq2seq_data(50, 1, 6, seed=3)
    assert src.shape == (50, 7) and tgt.shape == (50, 8) and (tgt[:, 0] == BOS).all()
    for s, t in zip(src.tolist(), tgt.tolist()):
        L = s.index(EOS)
        assert all(v >= FIRST_DIGIT for v in s[:L]) and all(v == PAD for v in s[L + 1:])
        assert t[1:L + 1] == s[:L][::-1] and t[L + 1] == EOS
    src, tgt = make_seq2seq_data(20, 2, 6, seed=3, task="sort")
    for s, t in zip(src.tolist(), tgt.tolist()):
        L = s.index(EOS)
        assert t[1:L + 1] == sorted(s[:L])
    assert torch.equal(make_seq2seq_data(5, 1, 4, seed=9)[0], make_seq2seq_data(5, 1, 4, seed=9)[0])
    pred = torch.tensor([[5, 4, EOS], [5, 3, EOS]])
    assert exact_match(pred, torch.tensor([[5, 4, EOS, PAD], [5, 4, EOS, PAD]])).tolist() == [True, False]
    with pytest.raises(ValueError):
        make_seq2seq_data(5, 0, 4, seed=0)


def test_encoder_classifier_without_positions_ignores_order():
    torch.manual_seed(0)
    x = torch.randn(4, 10, 6)
    perm = torch.randperm(10)
    plain = EncoderClassifier(6, 3, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=10, dropout=0.0, positions=False).eval()
    with_pe = EncoderClassifier(6, 3, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=10, dropout=0.0).eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), plain(x[:, perm]), atol=1e-5)
        assert not torch.allclose(with_pe(x), with_pe(x[:, perm]), atol=1e-4)
        keep = padding_mask(torch.tensor([10, 6, 3, 1]), 10)
        junk = x.clone()
        junk[1, 6:] = 100.0
        assert torch.allclose(with_pe(x, keep), with_pe(junk, keep), atol=1e-5)


def train_steps(model, batch_loss, n_examples, *, steps, batch_size, lr_at, seed, checkpoint=None, save_every=100):
    """Chapter 06's runs: the book's loop configured as the notebook configures it."""
    return train(model, lambda s: (batch_indices(n_examples, batch_size, s, seed),), steps=steps,
                 optimizer=paper_adam(model, lr_at(0)), lr_at=lr_at, loss=index_loss(batch_loss),
                 eval_every=save_every, checkpoint=checkpoint)["train"]


def test_train_steps_resumes_exactly(tmp_path, monkeypatch):
    """A run killed between checkpoints and resumed ends exactly where an uninterrupted one does (dropout on)."""
    import groundup.train as loop

    src, tgt = make_seq2seq_data(128, 1, 4, seed=0)
    cfg = TransformerConfig(src_vocab=13, tgt_vocab=13, d_model=16, n_heads=2, n_enc_layers=1, n_dec_layers=1, d_ff=32,
                            dropout=0.1, max_len=6)

    def loss(model, idx):
        logits = model(src[idx], tgt[idx, :-1])
        return label_smoothed_cross_entropy(logits.flatten(0, 1), tgt[idx, 1:].flatten(), 0.1, ignore_index=PAD)

    kw = dict(steps=12, batch_size=16, lr_at=lambda s: noam_lr(s, 16, 4), seed=0, save_every=5)
    torch.manual_seed(0)
    straight = Transformer(cfg)
    h1 = train_steps(straight, loss, 128, **kw)

    ckpt = tmp_path / "s2s.safetensors"
    monkeypatch.setattr(loop, "progress", crashing_progress(8))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_steps(Transformer(cfg), loss, 128, **kw, checkpoint=ckpt)
    monkeypatch.undo()
    torch.manual_seed(123)                       # a different initialization and RNG: all must come from the checkpoint
    resumed = Transformer(cfg)
    h2 = train_steps(resumed, loss, 128, **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert h1 == h2 and len(h2) == 12 and h1[-1][1] < h1[0][1]
