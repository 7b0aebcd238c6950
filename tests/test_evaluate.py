"""Tests of groundup.evaluate (chapter 16): the Fréchet distance against pytorch-fid and scipy, the feature
statistics, the classifier features and the Inception path without network."""

import numpy as np
import pytest
import scipy.linalg
import torch

from test_iddpm import OnMPS

from groundup.evaluate import (classifier_features, fd_cifar_classifier, feature_statistics, fid_inception,
                               frechet_distance, inception_features, load_inception, quick_classifier_path,
                               symmetric_sqrt)

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: see conftest.one_thread


def _features(seed, n, d, shift=0.0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ A + shift


@pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")   # SciPy vs pytorch-fid, not ours
@pytest.mark.parametrize("d,n", [(8, 50), (64, 400)])
def test_frechet_distance_matches_pytorch_fid_and_scipy(d, n):
    from pytorch_fid.fid_score import calculate_frechet_distance

    mu1, s1 = feature_statistics(_features(0, n, d))
    mu2, s2 = feature_statistics(_features(1, n, d, shift=0.2))
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = calculate_frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    direct = ((mu1 - mu2) ** 2).sum().item() + np.trace(s1.numpy() + s2.numpy() - 2 * covmean)
    assert ours == pytest.approx(ref, rel=1e-9)
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


def test_inception_without_network_says_why(monkeypatch, capsys):
    import urllib.error

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("no network in the unit tests")

    import pytorch_fid.inception as inc
    monkeypatch.setattr(inc, "load_state_dict_from_url", no_network, raising=False)
    with pytest.raises(RuntimeError, match="Inception weights could not be loaded"):
        load_inception()
    assert fid_inception(torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)) is None
    assert "FID (Inception) skipped" in capsys.readouterr().out


def test_quick_classifier_path_records_its_settings(tmp_path, monkeypatch):
    """A quick classifier trained with other settings is never loaded in place of the one asked for."""
    monkeypatch.setenv("BOOK_CHECKPOINT_DIR", str(tmp_path))
    default = quick_classifier_path("smoke")
    assert default.parent == tmp_path and default.suffix == ".safetensors"
    assert default == quick_classifier_path("smoke", n_train=2500, epochs=4, widths=(16, 32, 32))
    others = {quick_classifier_path("smoke", n_train=5000), quick_classifier_path("smoke", epochs=5),
              quick_classifier_path("smoke", widths=[16, 32, 64]), quick_classifier_path("full")}
    assert default not in others and len(others) == 4


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
            return [x.mean(dim=(2, 3), keepdim=True).as_subclass(OnMPS)]

    feats = inception_features(torch.rand(6, 3, 4, 4), FakeInception(), batch_size=4)
    assert feats.shape == (6, 3) and feats.dtype == torch.float64 and type(feats) is torch.Tensor
