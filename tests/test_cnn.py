"""Tests of the code chapter 03 exports (lib/groundup/cnn.py)."""

import math

import pytest
import torch

from conftest import Crash, crashing_progress
import torch.nn as nn
import torch.nn.functional as F

from groundup.cnn import (CifarClassifier, LeNet5, Lookahead, Normalize, Recipe, channel_stats, classifier_path,
                          conv2d_backward, conv2d_unfold, conv_output_size, epoch_augmentation, extract_features,
                          im2col, init_std, initialize_, load_cifar_classifier, max_pool2d_unfold, patch_whitening,
                          predict, save_cifar_classifier, smoothed_cross_entropy, train_classifier, translate_flip,
                          triangle_lr, weights_sha256)
from groundup.runtime import batch_indices


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1), ((2, 1), (0, 2))])
def test_conv_by_unfold_matches_conv2d_values_and_gradients(stride, padding):
    g = _gen()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    ours, ref = conv2d_unfold(x, w, b, stride, padding), F.conv2d(x, w, b, stride, padding)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    up = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    for a, r in zip(torch.autograd.grad((ours * up).sum(), (x, w, b)), torch.autograd.grad((ref * up).sum(), (x, w, b))):
        assert torch.allclose(a, r, rtol=1e-12, atol=1e-12)
    assert torch.equal(im2col(x, (3, 2), stride, padding), F.unfold(x, (3, 2), padding=padding, stride=stride))


def test_flipped_filter_is_caught():
    g = _gen(1)
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, generator=g)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g)
    assert not torch.allclose(conv2d_unfold(x, w.flip(-1, -2)), F.conv2d(x, w), atol=1e-6)


def test_conv_output_size():
    assert conv_output_size(32, 5) == 28 and conv_output_size(9, 3, 2, 1) == 5 and conv_output_size(8, 3, 2, 1) == 4


@pytest.mark.parametrize("stride,padding", [(1, 0), (2, 1)])
def test_conv2d_backward_by_hand_matches_autograd(stride, padding):
    g = _gen(2)
    x = torch.randn(3, 2, 8, 7, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(x, w, b, stride, padding)
    up = torch.randn(y.shape, dtype=torch.float64, generator=g)
    ref = torch.autograd.grad((y * up).sum(), (x, w, b))
    hand = conv2d_backward(up, x.detach(), w.detach(), stride, padding)
    for a, r in zip(hand, ref):
        assert a.shape == r.shape and torch.allclose(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,s,p", [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_max_pool_by_unfold_matches_values_and_gradients(k, s, p):
    g = _gen(3)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=g, requires_grad=True)
    ours, ref = max_pool2d_unfold(x, k, s, p), F.max_pool2d(x, k, s, p)
    assert torch.equal(ours, ref)
    up = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    g_ours, g_ref = torch.autograd.grad((ours * up).sum(), x)[0], torch.autograd.grad((ref * up).sum(), x)[0]
    assert torch.allclose(g_ours, g_ref, rtol=1e-12, atol=1e-12)   # overlapping windows add in another order


def test_init_std_matches_torch_init():
    w = torch.empty(128, 64, 3, 3)
    assert init_std(w, "kaiming") == pytest.approx(math.sqrt(2 / (64 * 9)))
    assert init_std(w, "xavier") == pytest.approx(math.sqrt(2 / (64 * 9 + 128 * 9)))
    assert init_std(torch.empty(10, 20), "xavier") == pytest.approx(math.sqrt(2 / 30))
    ours = w.clone().normal_(0, init_std(w, "kaiming"), generator=_gen()).std()
    assert abs(ours / nn.init.kaiming_normal_(w, nonlinearity="relu").std() - 1) < 0.02
    with pytest.raises(ValueError):
        init_std(w, "orthogonal")
    net = initialize_(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 4)), "small")
    assert net[0].bias.abs().sum() == 0 and abs(net[1].weight.std() - 0.01) < 0.005


def test_lenet5_shapes_and_parameter_count():
    net = LeNet5()
    assert net(torch.rand(4, 3, 32, 32)).shape == (4, 10)
    assert sum(p.numel() for p in net.parameters()) == 62_006      # C1 456 + C3 2,416 + C5 48,120 + F6 10,164 + 850
    assert LeNet5(in_channels=1, activation="tanh", pool="avg")(torch.rand(2, 1, 32, 32)).shape == (2, 10)


def test_augmentation_is_deterministic_and_moves_pixels():
    a, b = epoch_augmentation(50, 3, 0, 2, "random"), epoch_augmentation(50, 3, 0, 2, "random")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    dy, dx, _ = a
    assert dy.min() >= 0 and dy.max() <= 4 and len(set(dx.tolist())) > 1
    f0, f1 = epoch_augmentation(50, 0, 0, 2, "alternate")[2], epoch_augmentation(50, 1, 0, 2, "alternate")[2]
    assert torch.equal(f0, ~f1) and torch.equal(f0, epoch_augmentation(50, 2, 0, 2, "alternate")[2])
    assert not epoch_augmentation(50, 0, 0, 0, "none")[2].any()
    x = torch.rand(3, 2, 6, 6)
    same = translate_flip(F.pad(x, (2,) * 4, mode="reflect"), torch.full((3,), 2), torch.full((3,), 2),
                          torch.tensor([False, True, False]), 6)
    assert torch.equal(same[0], x[0]) and torch.equal(same[1], x[1].flip(-1))
    shifted = translate_flip(F.pad(x, (1,) * 4), torch.zeros(3, dtype=torch.long), torch.full((3,), 2),
                             torch.zeros(3, dtype=torch.bool), 6)
    assert torch.equal(shifted[:, :, 1:, :5], x[:, :, :5, 1:])     # content moved down 1 and left 1


def test_epoch_batches_equal_batch_indices_per_step():
    n, bs, spe, seed = 100, 16, 6, 3
    for epoch in (0, 2):
        order = batch_indices(n, spe * bs, epoch, seed).view(spe, bs)
        for i in range(spe):
            assert torch.equal(order[i], batch_indices(n, bs, epoch * spe + i, seed))


def test_smoothed_cross_entropy_matches_torch():
    g = _gen(4)
    logits = torch.randn(32, 10, dtype=torch.float64, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    for eps in (0.0, 0.1, 0.2):
        assert torch.allclose(smoothed_cross_entropy(logits, y, eps), F.cross_entropy(logits, y, label_smoothing=eps),
                              rtol=1e-12)


def test_triangle_lr_shape():
    assert triangle_lr(0, 100) == pytest.approx(0.2)
    assert triangle_lr(23, 100) == pytest.approx(1.0)
    assert triangle_lr(100, 100) == pytest.approx(0.07)
    assert triangle_lr(10, 100) < triangle_lr(20, 100) and triangle_lr(60, 100) > triangle_lr(90, 100)


def test_lookahead_update():
    model = nn.Linear(3, 2)
    la = Lookahead(model)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    la.update(model, decay=0.0)                 # rho = 0: plain SGD, fast weights kept
    assert torch.equal(model.weight, start + 1)
    with torch.no_grad():
        model.weight.add_(1.0)
    la.update(model, decay=0.5)                 # halfway between slow (start + 1) and fast (start + 2)
    assert torch.allclose(model.weight, start + 1.5)
    with torch.no_grad():
        model.weight.add_(5.0)
    la.update(model, decay=1.0)                 # back to the slow weights
    assert torch.allclose(model.weight, start + 1.5)


def test_patch_whitening_decorrelates():
    g = _gen(5)
    mix = torch.tensor([[1.0, 0.8, 0.5], [0.0, 0.6, 0.4], [0.0, 0.0, 0.3]])
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(50, 3, 12, 12, generator=g))   # correlated channels
    W = patch_whitening(x, eps=0.0)
    assert W.shape == (24, 3, 2, 2) and torch.allclose(W[12:], -W[:12])
    out = F.conv2d(x, W[:12]).transpose(0, 1).reshape(12, -1).double()
    cov = torch.cov(out)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=1e-3)


def test_cifar_classifier_shapes_normalization_and_identity_init():
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    model = CifarClassifier((8, 16, 16), mean=mean, std=std)
    x = torch.rand(3, 3, 32, 32)
    assert model(x).shape == (3, 10) and model.features(x).shape == (3, 16)
    assert torch.allclose(model.normalize(x), (x - mean[:, None, None]) / std[:, None, None])
    assert not model.whiten.weight.requires_grad
    conv = model.blocks[2].conv1                                  # 16 -> 16: entirely the identity
    assert torch.equal(conv(x[:, :1].expand(3, 16, 32, 32).contiguous()), x[:, :1].expand(3, 16, 32, 32))
    m, s = channel_stats(torch.rand(10, 3, 4, 4) * 2)
    assert m.shape == s.shape == (3,)


def test_predict_flip_tta_is_flip_invariant():
    torch.manual_seed(0)
    model = CifarClassifier((4, 8, 8)).eval()
    x = torch.rand(5, 3, 16, 16)
    assert torch.equal(predict(model, x, "flip"), predict(model, x.flip(-1), "flip"))
    assert predict(model, x, "flip+translate").shape == (5, 10)
    assert not model.training


def _tiny_problem(size=16):
    """96 random 16x16 images: the training function and the networks work at any image size."""
    g = _gen(6)
    X = torch.rand(96, 3, size, size, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    return X, y


def test_train_classifier_resumes_exactly(tmp_path, monkeypatch):
    """A run stopped after an epoch and resumed from its checkpoint ends exactly where an uninterrupted
    one does: weights, batch-norm statistics, lookahead's slow weights and the loss history."""
    import groundup.cnn as cnn

    X, y = _tiny_problem()
    recipe = Recipe(epochs=3, batch_size=32, lr=0.1, momentum=0.85, nesterov=True, weight_decay=1e-3,
                    bias_lr_mult=8.0, schedule="triangle", label_smoothing=0.2, translate=2, flip="alternate",
                    lookahead_every=2)

    torch.manual_seed(0)
    straight = CifarClassifier((4, 8, 8))
    h1 = train_classifier(straight, X, y, X[:32], y[:32], recipe)

    ckpt = tmp_path / "fast.safetensors"
    monkeypatch.setattr(cnn, "progress", crashing_progress(2))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_classifier(CifarClassifier((4, 8, 8)), X, y, X[:32], y[:32], recipe, checkpoint=ckpt)
    monkeypatch.undo()
    torch.manual_seed(123)   # a different initialization: everything must come from the checkpoint
    resumed = CifarClassifier((4, 8, 8))
    h2 = train_classifier(resumed, X, y, X[:32], y[:32], recipe, checkpoint=ckpt)
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert h1["train_loss"] == h2["train_loss"] and h1["eval_acc"] == h2["eval_acc"]
    assert len(h2["train_loss"]) == 9 and h1["train_loss"][0][1] > 0


def test_train_classifier_learns_and_lenet_dropout_resumes(tmp_path):
    X, y = _tiny_problem(32)
    recipe = Recipe(epochs=2, batch_size=32, lr=0.05, weight_decay=5e-4, translate=1, flip="random")
    torch.manual_seed(0)
    a = nn.Sequential(Normalize([0.5] * 3, [0.25] * 3), LeNet5(dropout=0.3))
    ha = train_classifier(a, X, y, X, y, recipe)
    torch.manual_seed(0)
    b = nn.Sequential(Normalize([0.5] * 3, [0.25] * 3), LeNet5(dropout=0.3))
    train_classifier(b, X, y, X, y, recipe, checkpoint=tmp_path / "lenet.safetensors")
    hb = train_classifier(b, X, y, X, y, recipe, checkpoint=tmp_path / "lenet.safetensors")   # already done: no-op
    assert ha["train_loss"] == hb["train_loss"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [s for s, _ in ha["eval_acc"]] == [3, 6] and len(ha["seconds"]) == 2


def test_classifier_checkpoint_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("BOOK_PROFILE", "smoke")
    with pytest.raises(FileNotFoundError, match="chapter 03"):
        load_cifar_classifier()
    with pytest.raises(FileNotFoundError, match="chapter 03"):
        load_cifar_classifier(tmp_path / "missing.safetensors")

    torch.manual_seed(0)
    model = CifarClassifier((4, 8, 8), mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26]).eval()
    model.init_whitening(torch.rand(20, 3, 32, 32))
    assert classifier_path("full").name == "03_cifar_classifier.safetensors"
    save_cifar_classifier(model, classifier_path(), test_accuracy=0.5, profile="smoke")
    loaded = load_cifar_classifier()                              # smoke profile: falls back to the smoke file
    assert loaded.info["test_accuracy"] == 0.5 and loaded.info["mean"] == pytest.approx([0.49, 0.48, 0.45])
    assert loaded.widths == (4, 8, 8) and not loaded.training
    x = torch.rand(7, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    feats = extract_features(loaded, x, batch_size=3)
    assert feats.shape == (7, 8) and feats.dtype == torch.float32
    assert torch.allclose(feats, model.features(x), atol=1e-6)

    monkeypatch.setenv("BOOK_PROFILE", "full")                    # the full profile never uses a smoke classifier
    with pytest.raises(FileNotFoundError):
        load_cifar_classifier()


def test_classifier_hash_names_its_weights_and_cpu_file_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("BOOK_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("BOOK_PROFILE", "full")
    torch.manual_seed(0)
    model = CifarClassifier((4, 8, 8)).eval()
    model.init_whitening(torch.rand(20, 3, 32, 32))
    digest = weights_sha256(model)
    assert len(digest) == 12 and digest == weights_sha256(model)
    other = CifarClassifier((4, 8, 8))
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.head.weight[0, 0] += 1e-6                           # one weight changed: another hash
    assert weights_sha256(other) != digest

    save_cifar_classifier(model, classifier_path("cpu"), profile="cpu")
    loaded = load_cifar_classifier()                              # no full file: the cpu one
    assert loaded.info["profile"] == "cpu" and loaded.info["weights_sha256"] == digest
    assert weights_sha256(loaded) == digest

    save_cifar_classifier(other, tmp_path / "tampered.safetensors")
    from groundup.checkpoint import read_extra, save_checkpoint
    extra = read_extra(tmp_path / "tampered.safetensors")
    save_checkpoint(tmp_path / "tampered.safetensors", other, step=0, extra=extra | {"weights_sha256": digest})
    with pytest.raises(ValueError, match="hash"):
        load_cifar_classifier(tmp_path / "tampered.safetensors")


def test_float64_work_leaves_mps_for_the_cpu():
    """Apple's MPS has no float64: the whitening's covariance is computed on the CPU there."""
    from groundup.cnn import float64_device

    assert float64_device("mps") == torch.device("cpu")
    assert float64_device(torch.device("mps", 0)) == torch.device("cpu")
    assert float64_device("cpu") == torch.device("cpu")
    assert float64_device("cuda:1") == torch.device("cuda", 1)


def test_patch_whitening_runs_its_float64_work_where_float64_device_says(monkeypatch):
    import groundup.cnn as cnn

    asked = []

    def spy(device):
        asked.append(torch.device(device))
        return torch.device("cpu")

    monkeypatch.setattr(cnn, "float64_device", spy)
    x = torch.randn(4, 3, 8, 8, generator=_gen(2))
    W = patch_whitening(x)
    assert asked == [torch.device("cpu")] and W.dtype == torch.float32 and W.device == x.device


def test_train_classifier_times_with_runtime_sync(monkeypatch):
    import groundup.cnn as cnn

    assert not hasattr(cnn, "_sync")                       # one sync, in groundup.runtime
    calls = []
    monkeypatch.setattr(cnn, "sync", lambda device: calls.append(torch.device(device)))
    g = _gen(3)
    X, y = torch.rand(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    recipe = Recipe(epochs=2, batch_size=16, lr=0.01, translate=0, flip="none")
    train_classifier(LeNet5(), X, y, X[:8], y[:8], recipe, device="cpu", desc="sync test")
    assert calls == [torch.device("cpu")] * 4              # before and after each epoch's steps
