"""Tests of the code chapter 04 exports (lib/groundup/rnn.py)."""

import math

import pytest
import torch

from conftest import Crash, crashing_progress
import torch.nn as nn

from groundup.basics import Adam
from groundup.rnn import (CharRNN, Recurrent, build_vocab, clip_grad_norm, compare_with_torch, decode, detach_state,
                          encode, get_batch, gru_cell, lstm_cell, recurrent_loss, rnn_cell, sample,
                          state_jacobian_norms, stream_batches, tbptt_steps)
from groundup.train import evaluate, train, warmup_cosine_lr


def evaluate_nats(model, data, block, streams=64):
    """Chapter 04's validation: the whole text as streams, state carried (the book's evaluate, configured)."""
    return evaluate(model, stream_batches(data, block, streams), loss=recurrent_loss, carry_state=True)


def train_char_rnn(model, train_data, val_data, *, epochs, block, batch_size, lr, warmup, clip, seed,
                   eval_every=1, checkpoint=None):
    """Chapter 04's run: the book's loop with truncated BPTT (carry_state), as the notebook configures it."""
    steps_per_epoch = tbptt_steps(len(train_data), block, batch_size)
    total = epochs * steps_per_epoch
    return train(model, lambda step: get_batch(train_data, block, batch_size, step, seed), steps=total,
                 optimizer=Adam(model.parameters(), lr=lr),
                 lr_at=lambda step: warmup_cosine_lr(step, steps=total, lr=lr, warmup=warmup),
                 loss=recurrent_loss, carry_state=True, reset_state_every=steps_per_epoch,
                 evaluate=lambda m: evaluate_nats(m, val_data, block), eval_every=eval_every * steps_per_epoch,
                 grad_clip=clip, checkpoint=checkpoint, desc="char LSTM")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny recurrent models run thousands of tiny operations: with several threads each pays for their
    synchronisation, which on a busy machine costs 100x more than the arithmetic. One thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cell_weights(module):
    return module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh


def test_cells_match_torch_cells_float64():
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    h = torch.randn(4, 5, dtype=torch.float64)
    c = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        ref = nn.RNNCell(6, 5).double()
        assert torch.allclose(rnn_cell(x, h, *_cell_weights(ref)), ref(x, h), atol=1e-14)
        ref = nn.GRUCell(6, 5).double()
        assert torch.allclose(gru_cell(x, h, *_cell_weights(ref)), ref(x, h), atol=1e-14)
        ref = nn.LSTMCell(6, 5).double()
        for ours, theirs in zip(lstm_cell(x, (h, c), *_cell_weights(ref)), ref(x, (h, c))):
            assert torch.allclose(ours, theirs, atol=1e-14)


@pytest.mark.parametrize("mode", ["rnn", "lstm", "gru"])
def test_unrolled_layers_match_torch_with_gradients(mode):
    errors = compare_with_torch(mode, num_layers=2, seed=3)
    assert set(errors) == {"output", "final state", "gradients"}
    assert max(errors.values()) < 1e-12, errors


def test_wrong_gate_order_is_caught():
    """The comparison can fail: an LSTM reading PyTorch's weights in TensorFlow's order (i, g, f, o)."""
    def tf_order(x, state, W_ih, W_hh, b_ih, b_hh):
        h, c = state
        a_i, a_g, a_f, a_o = (x @ W_ih.T + b_ih + h @ W_hh.T + b_hh).chunk(4, dim=-1)
        c = torch.sigmoid(a_f) * c + torch.sigmoid(a_i) * torch.tanh(a_g)
        return torch.sigmoid(a_o) * torch.tanh(c), c

    wrong = Recurrent("lstm", 5, 4, 2)
    wrong.cell = tf_order
    assert compare_with_torch("lstm", wrong)["output"] > 1e-3


def test_recurrent_has_torch_parameter_names_and_init_scale():
    for mode, cls in (("rnn", nn.RNN), ("lstm", nn.LSTM), ("gru", nn.GRU)):
        ours, ref = Recurrent(mode, 7, 16, 3), cls(7, 16, 3)
        assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
        assert all(p.abs().max() <= 1 / math.sqrt(16) for p in ours.parameters())


def test_jacobian_norms_of_linear_rnn_are_powers_of_rho():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    xs = torch.randn(12, 3, generator=g, dtype=torch.float64)
    W_in = torch.randn(8, 3, generator=g, dtype=torch.float64)
    for rho in (0.7, 1.3):
        norms = state_jacobian_norms(lambda x, s: (x @ W_in.T + s[0] @ (rho * Q).T,),
                                     (torch.zeros(8, dtype=torch.float64),), xs)
        assert torch.allclose(norms, rho ** torch.arange(1, 13, dtype=torch.float64), rtol=1e-10)


def test_jacobian_norms_match_autograd_jacobian_for_lstm_state():
    """The one-backward-pass trick against torch.autograd.functional.jacobian, state (h, c)."""
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 4).double()
    xs = torch.randn(5, 3, dtype=torch.float64)
    step = lambda x, s: cell(x, s)                                          # noqa: E731
    norms = state_jacobian_norms(step, (torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)), xs)
    h, c = torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
    for t in range(5):                                                      # state s_2 (before input 2)
        if t == 2:
            s2 = torch.cat([h, c], 1).detach()
        h, c = cell(xs[t:t + 1], (h, c))

    def h_T(s):
        hh, cc = s[:, :4], s[:, 4:]
        for t in range(2, 5):
            hh, cc = cell(xs[t:t + 1], (hh, cc))
        return hh
    J = torch.autograd.functional.jacobian(h_T, s2).reshape(4, 8)
    assert torch.allclose(norms[5 - 2 - 1], torch.linalg.matrix_norm(J, ord=2), rtol=1e-10)


def test_clip_grad_norm_matches_torch():
    for max_norm in (0.1, 1e9):
        torch.manual_seed(0)
        a, b = nn.Linear(6, 3), nn.Linear(6, 3)
        b.load_state_dict(a.state_dict())
        x = torch.randn(10, 6)
        for m in (a, b):
            (m(x) ** 2).sum().backward()
        n1 = clip_grad_norm(a.parameters(), max_norm)
        n2 = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
        assert torch.allclose(n1, n2, rtol=1e-6)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in a.parameters()]))
    assert after <= 1e9
    torch.manual_seed(0)
    m = nn.Linear(6, 3)
    (m(torch.randn(10, 6)) ** 2).sum().backward()
    clip_grad_norm(m.parameters(), 0.1)
    assert abs(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in m.parameters()])).item() - 0.1) < 1e-6


def test_get_batch_streams_continue_and_are_pure():
    data = torch.arange(1000)
    block, bs = 7, 4
    steps = tbptt_steps(len(data), block, bs)
    assert steps == (1000 - 7) // 4 // 7
    for step in range(3 * steps):
        x, y = get_batch(data, block, bs, step, seed=5)
        assert x.shape == y.shape == (bs, block)
        assert torch.equal(y, x + 1)                                        # targets: the next token
        assert int(y.max()) <= 999
        x2, _ = get_batch(data, block, bs, step, seed=5)
        assert torch.equal(x, x2)                                           # a pure function of the step
        if step % steps:                                                    # within an epoch rows continue
            assert torch.equal(x[:, 0], prev[:, -1] + 1)                    # noqa: F821
        prev = x                                                            # noqa: F841
    offsets = {int(get_batch(data, block, bs, e * steps, seed=5)[0][0, 0]) for e in range(20)}
    assert len(offsets) > 1 and all(0 <= o < block for o in offsets)       # epochs start at different offsets
    with pytest.raises(ValueError):
        tbptt_steps(20, 8, 4)


def test_vocab_round_trip():
    vocab = build_vocab("hello, world")
    assert vocab == sorted(set("hello, world"))
    assert decode(encode("low, led", vocab), vocab) == "low, led"


def test_detach_state():
    h = torch.ones(2, requires_grad=True) * 2
    assert not detach_state(h).requires_grad
    assert all(not s.requires_grad for s in detach_state((h, h * 3)))


def test_evaluate_nats_of_a_uniform_model_is_log_vocab():
    model = CharRNN(10, emb=4, hidden=6, layers=1)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    data = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    assert abs(evaluate_nats(model, data, block=16, streams=4) - math.log(10)) < 1e-6


def test_evaluate_nats_is_independent_of_block():
    """Reading in chunks with the state carried is the same computation as reading at once."""
    torch.manual_seed(0)
    model = CharRNN(10, emb=4, hidden=6, layers=2)
    data = torch.randint(0, 10, (401,), generator=torch.Generator().manual_seed(1))
    assert abs(evaluate_nats(model, data, block=7, streams=4) - evaluate_nats(model, data, block=1000, streams=4)) < 1e-5


def test_char_rnn_with_our_layer_equals_torch_layer():
    torch.manual_seed(0)
    ref = CharRNN(12, emb=5, hidden=8, layers=2, forget_bias=1.0)
    ours = CharRNN(12, emb=5, hidden=8, layers=2, ours=True)
    ours.load_state_dict(ref.state_dict())
    assert torch.all(ref.rnn.bias_ih_l1[8:16] == 1.0) and torch.all(ref.rnn.bias_hh_l1[8:16] == 0.0)
    idx = torch.randint(0, 12, (3, 9))
    (a, (h1, c1)), (b, (h2, c2)) = ref(idx), ours(idx)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(h1, h2, atol=1e-6) and torch.allclose(c1, c2, atol=1e-6)


def test_sample_temperature():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.z = nn.Parameter(torch.tensor([3.0, 0.0, 1.0]))

        def forward(self, idx, state=None):
            return self.z.expand(*idx.shape, -1), state

    assert sample(Fixed(), torch.tensor([1]), 4, temperature=0) == [0, 0, 0, 0]    # greedy
    g = torch.Generator().manual_seed(0)
    cold = sample(Fixed(), torch.tensor([1]), 2000, 0.25, g)
    hot = sample(Fixed(), torch.tensor([1]), 2000, 4.0, g)
    assert cold.count(0) > 1990                   # p(0) = 0.99999 at tau = 1/4
    assert 0.35 < hot.count(0) / 2000 < 0.5       # p(0) = 0.42 at tau = 4
    a = sample(Fixed(), torch.tensor([1]), 50, 1.0, torch.Generator().manual_seed(7))
    b = sample(Fixed(), torch.tensor([1]), 50, 1.0, torch.Generator().manual_seed(7))
    assert a == b


def test_sample_carries_state():
    """Sampling token by token gives the same logits as one pass over prompt + samples."""
    torch.manual_seed(0)
    model = CharRNN(9, emb=4, hidden=6, layers=2)
    prompt = torch.tensor([1, 2, 3])
    out = sample(model, prompt, 5, temperature=0)
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt.tolist() + out]))
    greedy = logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
    assert greedy == out


def test_training_reduces_loss():
    torch.manual_seed(0)
    text = "abcabcabcabd" * 60
    vocab = build_vocab(text)
    data = encode(text, vocab)
    model = CharRNN(len(vocab), emb=8, hidden=16, layers=1)
    before = evaluate_nats(model, data, block=16, streams=4)
    h = train_char_rnn(model, data, data, epochs=6, block=8, batch_size=8, lr=1e-2, warmup=5, clip=1.0, seed=0)
    assert h["val"][-1][1] < 0.5 * before
    assert len(h["grad_norm"]) == len(h["train"]) == 6 * tbptt_steps(len(data), 8, 8)


def test_train_char_rnn_resumes_exactly(tmp_path, monkeypatch):
    """A run killed mid-epoch and resumed from its last checkpoint (an epoch boundary, where the carried
    state is reset) ends exactly where an uninterrupted one does, dropout randomness included."""
    import groundup.train as loop

    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 11, (600,), generator=g)
    val = torch.randint(0, 11, (200,), generator=g)
    kw = dict(epochs=3, block=8, batch_size=4, lr=3e-3, warmup=4, clip=0.5, seed=1)
    steps = tbptt_steps(len(train), 8, 4)                                   # 18 per epoch

    torch.manual_seed(0)
    straight = CharRNN(11, emb=6, hidden=10, layers=2, dropout=0.3)
    h1 = train_char_rnn(straight, train, val, **kw)

    ckpt = tmp_path / "rnn.safetensors"
    monkeypatch.setattr(loop, "progress", crashing_progress(steps + 5))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_char_rnn(CharRNN(11, emb=6, hidden=10, layers=2, dropout=0.3), train, val, **kw, checkpoint=ckpt)
    monkeypatch.undo()
    torch.manual_seed(123)     # a different init and random state: everything must come from the checkpoint
    resumed = CharRNN(11, emb=6, hidden=10, layers=2, dropout=0.3)
    h2 = train_char_rnn(resumed, train, val, **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for key in ("train", "grad_norm", "val", "lr"):
        assert h1[key] == h2[key], key
    assert [s for s, _ in h1["train_seconds"]] == [s for s, _ in h2["train_seconds"]]
    assert h2["train_seconds"][-1][1] >= h2["train_seconds"][0][1] > 0                  # time carried over the crash
    assert len(h2["train"]) == 3 * steps and len(h2["val"]) == 3


def test_get_batch_makes_its_indices_on_the_data_device():
    """No index tensor is built on the host and copied per step (on a GPU that copy synchronizes): the
    operators show no aten::to / _to_copy / copy_ (on the CPU a copy would be a silent no-op)."""
    from torch.profiler import ProfilerActivity, profile
    data = torch.arange(1000)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        get_batch(data, 7, 4, 30, seed=5)
    names = {e.key for e in prof.key_averages()}
    assert not names & {"aten::to", "aten::_to_copy", "aten::copy_", "aten::item", "aten::_local_scalar_dense"}, names


@pytest.mark.parametrize("training", [True, False])
def test_sample_and_evaluate_restore_the_models_mode(training):
    """Sampling or validating in the middle of a run must not switch dropout on or off for what follows."""
    torch.manual_seed(0)
    model = CharRNN(10, emb=4, hidden=8, layers=2, dropout=0.5).train(training)
    sample(model, torch.tensor([1, 2]), 3, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert model.training is training and model.rnn.training is training
    x = torch.randint(0, 10, (2, 6))
    evaluate(model, [(x[:, :-1], x[:, 1:])], loss=recurrent_loss)
    assert model.training is training and model.rnn.training is training
