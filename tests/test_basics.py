"""Tests of the code chapter 01 exports (lib/groundup/basics.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from groundup.basics import (Adam, SGD, accuracy, add_bias_column, compare_optimizers, cross_entropy,
                             finite_difference_grad, gradient_descent_lstsq, least_squares, log_softmax,
                             train_softmax_regression)


def test_least_squares_matches_lstsq_with_ridge():
    g = torch.Generator().manual_seed(0)
    X = add_bias_column(torch.randn(50, 7, generator=g, dtype=torch.float64))
    Y = torch.randn(50, 3, generator=g, dtype=torch.float64)
    for ridge in (0.0, 0.5):
        W = least_squares(X, Y, ridge=ridge)
        aug_X = torch.cat([X, math.sqrt(ridge) * torch.eye(8, dtype=torch.float64)])
        aug_Y = torch.cat([Y, torch.zeros(8, 3, dtype=torch.float64)])
        assert torch.allclose(W, torch.linalg.lstsq(aug_X, aug_Y).solution, atol=1e-10)


def test_least_squares_recovers_exact_line():
    X = add_bias_column(torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64))
    w = least_squares(X, 3 * X[:, :1] - 2)
    assert torch.allclose(w.flatten(), torch.tensor([3.0, -2.0], dtype=torch.float64))


def test_cross_entropy_matches_torch_and_is_stable():
    z = torch.randn(32, 10) * 5
    y = torch.randint(0, 10, (32,))
    assert torch.allclose(cross_entropy(z, y), F.cross_entropy(z, y), atol=1e-6)
    assert torch.allclose(log_softmax(z), F.log_softmax(z, -1), atol=1e-6)
    huge = z * 1e5
    assert torch.isfinite(cross_entropy(huge, y))
    assert torch.allclose(cross_entropy(huge, y), F.cross_entropy(huge, y), rtol=1e-6)


@pytest.mark.parametrize("ours,ref", [
    (lambda p: SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (lambda p: SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
     lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2)),
    (lambda p: Adam(p, lr=1e-2, betas=(0.8, 0.99)), lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99))),
    (lambda p: Adam(p, lr=1e-2, weight_decay=1e-2, decoupled=False),
     lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2)),
    (lambda p: Adam(p, lr=1e-2, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1)),
])
def test_optimizers_match_torch_optim(ours, ref):
    assert compare_optimizers(ours, ref, steps=30) < 1e-12


def test_compare_optimizers_detects_a_wrong_optimizer():
    # Adam without bias correction differs from torch's: the comparison must notice.
    class NoBiasCorrection(Adam):
        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state.setdefault(p, {})
                    m = st.setdefault("m", torch.zeros_like(p))
                    v = st.setdefault("v", torch.zeros_like(p))
                    m.mul_(0.9).add_(p.grad, alpha=0.1)
                    v.mul_(0.999).addcmul_(p.grad, p.grad, value=0.001)
                    p.addcdiv_(m, v.sqrt() + 1e-8, value=-group["lr"])
    assert compare_optimizers(lambda p: NoBiasCorrection(p, lr=1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)) > 1e-4


def test_finite_difference_grad_of_quadratic():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    x = torch.tensor([0.5, -1.0], dtype=torch.float64)
    grad = finite_difference_grad(lambda v: 0.5 * v @ A @ v, x.clone())
    assert torch.allclose(grad, A @ x, atol=1e-8)


def test_gradient_descent_threshold():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(100, 3, generator=g, dtype=torch.float64)
    y = X @ torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    eta_max = 2 / torch.linalg.eigvalsh(2 / 100 * X.T @ X).max().item()
    assert gradient_descent_lstsq(X, y, 0.9 * eta_max, 500)[-1] < 1e-10
    assert gradient_descent_lstsq(X, y, 1.1 * eta_max, 500)[-1] > 1e6


def test_accuracy():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(scores, torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)


def test_softmax_regression_learns_and_resumes(tmp_path):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(640, 20, generator=g)
    y = (X @ torch.randn(20, 10, generator=g)).argmax(1)      # linearly separable labels
    kw = dict(batch_size=64, lr=5e-2, seed=0)
    straight, history = train_softmax_regression(X, y, epochs=4, **kw)
    assert history[-1][1] < history[0][1] / 2
    assert accuracy(straight(X), y) > 0.8
    ckpt = tmp_path / "c.safetensors"
    train_softmax_regression(X, y, epochs=2, checkpoint=ckpt, **kw)
    resumed, resumed_history = train_softmax_regression(X, y, epochs=4, checkpoint=ckpt, **kw)
    assert torch.equal(straight.weight, resumed.weight)
    assert [s for s, _ in resumed_history] == list(range(40))
