"""Chapter 24's exported code (lib/groundup/gpt_text.py): captions as characters, a chapter-07 GPT's
hidden states at every depth, the three readouts, and the attention probe."""

import pytest
import torch

from groundup.gpt import GPT, GPTConfig
from groundup.gpt_text import (READOUTS, AttentionProbe, caption_char_ids, fit_probe,
                               gpt_caption_states, gpt_hidden_states, readout, unit_rms)

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread

VOCAB = sorted(set("\n abcdefghijklmnopqrstuvwxyz3"))


def tiny_gpt(pos_encoding="learned", seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=len(VOCAB), block_size=32, n_layer=2, n_head=2, n_embd=16,
                          pos_encoding=pos_encoding))
    with torch.no_grad():
        for p in model.parameters():          # away from the init, so that every depth differs
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_caption_char_ids_replaces_and_reports_unknown_characters():
    ids, lost = caption_char_ids("a 7 and 3", VOCAB)
    assert lost == ["7"]
    assert "".join(VOCAB[i] for i in ids) == "\na   and 3"
    ids, lost = caption_char_ids("", VOCAB)
    assert ids.tolist() == [VOCAB.index("\n")] and lost == []
    with pytest.raises(ValueError):
        caption_char_ids("x", VOCAB, unknown="?")


def test_hidden_states_equal_a_forward_by_hand_and_leave_the_model_as_it_was():
    model = tiny_gpt().train()
    idx = torch.randint(0, len(VOCAB), (3, 9))
    states = gpt_hidden_states(model, idx)
    assert len(states) == model.config.n_layer + 2
    with torch.no_grad():
        t = model.transformer
        h = t.wte(idx) + t.wpe(torch.arange(9))
        by_hand = [h]
        for block in t.h:
            h = h + block.attn(block.ln_1(h))
            h = h + block.mlp(block.ln_2(h))
            by_hand.append(h)
        by_hand.append(t.ln_f(h))
        logits = model.eval()(idx)[0]
    model.train()
    for a, b in zip(states, by_hand):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.lm_head(states[-1]), logits, rtol=0, atol=1e-6)
    assert model.training                                         # its mode restored
    assert all(not m._forward_hooks for m in model.modules())     # and its hooks removed
    assert not torch.allclose(states[1], states[2])


@pytest.mark.parametrize("pos_encoding", ["learned", "rope"])
def test_right_padding_changes_no_state_of_a_caption(pos_encoding):
    model = tiny_gpt(pos_encoding)
    texts = ["a seven", "the figure three by hand", ""]
    states, mask, lost = gpt_caption_states(texts, model, VOCAB)
    assert mask.sum(1).tolist() == [len(t) + 1 for t in texts] and lost == [[], [], []]
    for k, text in enumerate(texts):
        alone, alone_mask, _ = gpt_caption_states([text], model, VOCAB)
        n = int(alone_mask.sum())
        for a, b in zip(alone, states):
            torch.testing.assert_close(a[0, :n], b[k, :n], rtol=0, atol=1e-5)
    with pytest.raises(ValueError):
        gpt_caption_states(["x" * 40], model, VOCAB)


def test_readouts_by_hand():
    torch.manual_seed(0)
    lengths = torch.tensor([4, 1, 6])
    mask = torch.arange(6)[None] < lengths[:, None]
    states = torch.randn(3, 6, 5)
    last = readout(states, mask, "last")
    mean = readout(states, mask, "mean")
    tokens = readout(states, mask, "tokens")
    assert last.shape == mean.shape == (3, 1, 5) and tokens.shape == (3, 6, 5)
    for k, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(last[k, 0], states[k, n - 1])
        m = states[k, :n].mean(0)
        torch.testing.assert_close(mean[k, 0], m / m.norm())
        assert torch.equal(tokens[k, :n], states[k, :n]) and not tokens[k, n:].any()
    with pytest.raises(ValueError):
        readout(states, mask, "first")
    assert READOUTS == ("last", "mean", "tokens")


def test_unit_rms_scales_the_real_rows_and_keeps_padding_zero():
    context = torch.randn(4, 5, 3) * 7.0
    context[:, 3:] = 0
    scaled = unit_rms(context)
    assert torch.isclose(scaled[:, :3].pow(2).mean(), torch.tensor(1.0), atol=1e-6)
    assert not scaled[:, 3:].any()
    torch.testing.assert_close(scaled * (context[:, :3].pow(2).mean().sqrt()), context)


def test_attention_probe_one_row_is_logistic_regression_and_ignores_padding():
    torch.manual_seed(0)
    probe = AttentionProbe(6, 3)
    with torch.no_grad():
        probe.query.normal_()
        one = torch.randn(5, 1, 6)
        torch.testing.assert_close(probe(one), probe.classify(one[:, 0]))
        rows = torch.randn(5, 4, 6)
        torch.testing.assert_close(probe(torch.cat([rows, torch.zeros(5, 2, 6)], 1)), probe(rows))
        assert not torch.allclose(probe(rows), probe.classify(rows.mean(1)))   # it does attend


def test_fit_probe_finds_the_one_row_that_carries_the_class():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(10)
    context = torch.randn(40, 3, 8, generator=g) * 0.3
    where = torch.randint(0, 3, (40,), generator=g)
    context[torch.arange(40), where, labels] += 3.0     # the class: in one row, a different one each
    context[torch.arange(40), where, 7] += 3.0              # and that row is marked
    probe = fit_probe(context, labels, n_classes=4, steps=100, lr=0.05)
    assert not probe.training
    with torch.no_grad():
        assert (probe(context).argmax(1) == labels).float().mean() == 1.0
