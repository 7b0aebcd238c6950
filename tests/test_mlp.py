"""Tests of the code chapter 02 exports (lib/groundup/mlp.py)."""

import math

import pytest
import torch

from conftest import Crash, crashing_progress

from groundup.basics import cross_entropy
from groundup.mlp import MLP, cosine_lr, evaluate, init_mlp, mlp_backward, mlp_forward, random_shift, train_mlp


def test_backward_matches_autograd_float64():
    g = torch.Generator().manual_seed(0)
    params = init_mlp(12, 9, 4, generator=g, dtype=torch.float64)
    X = torch.randn(7, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (7,), generator=g)
    logits, cache = mlp_forward(params, X)
    ours = mlp_backward(params, cache, logits, y)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    cross_entropy(mlp_forward(leaves, X)[0], y).backward()
    for k in params:
        assert ours[k].shape == params[k].shape
        assert torch.allclose(ours[k], leaves[k].grad, rtol=1e-10, atol=1e-14), k


def test_module_matches_functional_forward():
    model = MLP(d_in=12, hidden=9, d_out=4)
    params = {"W1": model.fc1.weight, "b1": model.fc1.bias, "W2": model.fc2.weight, "b2": model.fc2.bias}
    X = torch.randn(5, 12)
    assert torch.allclose(model(X), mlp_forward(params, X)[0], atol=1e-6)


def test_he_initialization_scale():
    params = init_mlp(1000, 2000, 10, generator=torch.Generator().manual_seed(0))
    assert abs(params["W1"].std().item() - math.sqrt(2 / 1000)) < 0.002
    assert abs(MLP(d_in=1000, hidden=2000).fc1.weight.std().item() - math.sqrt(2 / 1000)) < 0.002


def test_random_shift_moves_pixels_within_bounds():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(64, 28 * 28)
    x[:, 14 * 28 + 14] = 1.0                   # a centre pixel never leaves the image
    moved = random_shift(x, 3, g)
    assert torch.equal(moved.sum(1), torch.ones(64))
    rows, cols = moved.argmax(1) // 28, moved.argmax(1) % 28
    assert ((rows - 14).abs() <= 3).all() and ((cols - 14).abs() <= 3).all()
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10      # the offsets really vary
    assert torch.equal(random_shift(x, 0, g), x)


def test_cosine_lr_endpoints():
    assert cosine_lr(0, 100, 0.1) == 0.1
    assert abs(cosine_lr(50, 100, 0.1) - 0.05) < 1e-12
    assert cosine_lr(100, 100, 0.1) < 1e-12


def test_evaluate_perfect_classifier():
    X = torch.eye(10)
    model = torch.nn.Linear(10, 10)
    with torch.no_grad():
        model.weight.copy_(10 * torch.eye(10))
        model.bias.zero_()
    loss, acc = evaluate(model, X, torch.arange(10))
    assert acc == 1.0 and loss < 1e-3


def test_train_mlp_resumes_exactly(tmp_path, monkeypatch):
    """A run killed mid-epoch and resumed from its last checkpoint ends exactly where an
    uninterrupted one does: weights, loss history, dropout and augmentation randomness included."""
    import groundup.mlp as mlp

    g = torch.Generator().manual_seed(0)
    X = torch.rand(256, 784, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    kw = dict(epochs=4, batch_size=32, lr=1e-3, shift=2, seed=0)   # 8 steps per epoch

    torch.manual_seed(0)
    straight = MLP(hidden=16, dropout=0.3)
    h1 = train_mlp(straight, X, y, X[:64], y[:64], **kw)

    ckpt = tmp_path / "mlp.safetensors"
    monkeypatch.setattr(mlp, "progress", crashing_progress(13))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_mlp(MLP(hidden=16, dropout=0.3), X, y, X[:64], y[:64], **kw, checkpoint=ckpt)
    monkeypatch.undo()
    torch.manual_seed(123)   # different init and random state: everything must come from the checkpoint
    resumed = MLP(hidden=16, dropout=0.3)
    h2 = train_mlp(resumed, X, y, X[:64], y[:64], **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert h1["train_loss"] == h2["train_loss"]
    assert len(h2["train_loss"]) == 32
