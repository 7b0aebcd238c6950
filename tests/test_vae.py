"""Unit tests of groundup.vae (chapter 14): the KL, the likelihoods, the reparameterization, the model,
the importance-weighted bound and an exact resume of the training loop."""

import math

import pytest
import torch
from conftest import Crash, crashing_progress
from torch.distributions import Bernoulli, MultivariateNormal, Normal, kl_divergence

from groundup.vae import (VAE, VAEConfig, bernoulli_log_likelihood, binarize, dequantize,
                          discretized_gaussian_log_likelihood, evaluate_vae, gaussian_kl,
                          gaussian_log_density, grey_levels, iwae_bound, prepare_batch, reparameterize,
                          train_vae)


def _gaussians(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(4)]


def test_gaussian_kl_matches_torch_distributions():
    mu_q, lv_q, mu_p, lv_p = _gaussians((7, 5))
    ref = kl_divergence(Normal(mu_q, (0.5 * lv_q).exp()), Normal(mu_p, (0.5 * lv_p).exp())).sum(-1)
    assert torch.allclose(gaussian_kl(mu_q, lv_q, mu_p, lv_p), ref, rtol=0, atol=1e-12)
    ref0 = kl_divergence(Normal(mu_q, (0.5 * lv_q).exp()), Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(gaussian_kl(mu_q, lv_q), ref0, rtol=0, atol=1e-12)


def test_gaussian_kl_is_zero_only_for_equal_gaussians_and_asymmetric():
    mu, lv, mu2, lv2 = _gaussians((3, 4), seed=1)
    assert torch.allclose(gaussian_kl(mu, lv, mu, lv), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert (gaussian_kl(mu, lv, mu2, lv2) > 0).all()
    assert not torch.allclose(gaussian_kl(mu, lv, mu2, lv2), gaussian_kl(mu2, lv2, mu, lv))


def test_gaussian_kl_matches_monte_carlo():
    mu_q, lv_q, mu_p, lv_p = _gaussians((3, 4), seed=2)
    eps = torch.randn(100_000, 3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z = reparameterize(mu_q, lv_q, eps)
    terms = gaussian_log_density(z, mu_q, lv_q) - gaussian_log_density(z, mu_p, lv_p)
    se = terms.std(0) / math.sqrt(len(terms))
    assert ((terms.mean(0) - gaussian_kl(mu_q, lv_q, mu_p, lv_p)).abs() < 5 * se).all()


def test_log_likelihoods_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 30, generator=g, dtype=torch.float64) * 4
    x = torch.bernoulli(torch.full((6, 30), 0.3, dtype=torch.float64), generator=g)
    assert torch.allclose(bernoulli_log_likelihood(logits, x), Bernoulli(logits=logits).log_prob(x).sum(-1), atol=1e-12)
    mean, lv, xc, _ = _gaussians((6, 30), seed=4)
    ref = Normal(mean, (0.5 * lv).exp()).log_prob(xc).sum(-1)
    assert torch.allclose(gaussian_log_density(xc, mean, lv), ref, atol=1e-12)


def test_bernoulli_log_likelihood_is_stable_for_extreme_logits():
    out = bernoulli_log_likelihood(torch.tensor([[80.0, -80.0, 80.0]]), torch.tensor([[0.0, 1.0, 1.0]]))
    assert torch.isfinite(out).all() and abs(out.item() + 160.0) < 1e-3


def test_reparameterize_moments_and_gradient():
    mu = torch.tensor([0.5, -1.0], requires_grad=True)
    lv = torch.tensor([math.log(0.25), math.log(9.0)], requires_grad=True)
    eps = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0))
    z = reparameterize(mu, lv, eps)
    assert torch.allclose(z.mean(0), mu, atol=0.03) and torch.allclose(z.var(0), lv.exp(), rtol=0.02)
    z.var(0).sum().backward()                              # d Var[z] / d logvar = Var[z]
    assert torch.allclose(lv.grad, lv.exp().detach(), rtol=0.03)


@pytest.mark.parametrize("mean", [-1.7, -1.0, -0.31, 0.0, 0.52, 1.0, 2.4])
@pytest.mark.parametrize("scale", [1e-3, 0.01, 0.1, 1.0, 5.0])
def test_discretized_gaussian_sums_to_one_and_matches_cdf(mean, scale):
    """Eq. (15a): a distribution over the 256 levels, each the Gaussian's mass on its bin (the edge
    bins reach to -inf and +inf)."""
    k = torch.arange(256, dtype=torch.float64)
    x = k / 127.5 - 1
    log_scale = torch.full_like(x, math.log(scale))
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), log_scale)
    assert abs(logp.exp().sum().item() - 1) < 1e-9
    normal = Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64))
    upper = torch.where(k == 255, 1.0, normal.cdf(x + 1 / 255))
    lower = torch.where(k == 0, 0.0, normal.cdf(x - 1 / 255))
    assert (logp.exp() - (upper - lower)).abs().max() < 1e-11
    assert (logp <= 0).all()


def test_discretized_gaussian_is_accurate_in_both_tails_in_float32():
    """Bins about six standard deviations from the mean, on either side (masses 1e-11..1e-9):
    float32 agrees with an independent float64 computation (Python's math.erfc), where the direct
    CDF difference and torch.special.ndtr, (1 + erf) / 2, round the mass to 0 or to a multiple of
    float32's epsilon."""
    cases = [(0.6, 0.0, 0.1), (-0.6, 0.0, 0.1), (0.3, -0.05, 0.055), (-0.45, 0.2, 0.1)]
    x, mean, scale = (torch.tensor(c) for c in zip(*cases))
    ours = discretized_gaussian_log_likelihood(x, mean, scale.log())

    def mass(xi, m, s):                        # Q(z) = erfc(z / sqrt 2) / 2, in the bin's tail
        lo, hi = (xi - m - 1 / 255) / s, (xi - m + 1 / 255) / s
        if lo > 0:
            return 0.5 * math.erfc(lo / math.sqrt(2)) - 0.5 * math.erfc(hi / math.sqrt(2))
        return 0.5 * math.erfc(-hi / math.sqrt(2)) - 0.5 * math.erfc(-lo / math.sqrt(2))

    ref = torch.tensor([math.log(mass(*c)) for c in cases], dtype=torch.float64)
    assert (ref > math.log(1e-11)).all() and (ref < math.log(1e-8)).all()
    assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=0)
    x64, mean64, scale64 = (torch.tensor(c, dtype=torch.float64) for c in zip(*cases))
    ours64 = discretized_gaussian_log_likelihood(x64, mean64, scale64.log())
    assert torch.allclose(ours64, ref, rtol=1e-9, atol=0)


def test_discretized_gaussian_edges_and_range():
    # the edge bins reach to -inf and +inf: a mean far outside [-1, 1] gives them probability ~1
    edge = discretized_gaussian_log_likelihood(torch.tensor([-1.0, 1.0]), torch.tensor([-3.0, 3.0]),
                                               torch.zeros(2))
    assert torch.allclose(edge, torch.special.log_ndtr(torch.tensor([2.0 + 1 / 255] * 2)))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        discretized_gaussian_log_likelihood(torch.tensor([255.0]), torch.zeros(1), torch.zeros(1))
    x = torch.zeros(3, device="meta")                 # off the CPU the range is not read back
    assert discretized_gaussian_log_likelihood(x, x, x).shape == (3,)
    imgs = torch.tensor([[0, 1, 127, 128, 255]], dtype=torch.uint8)
    assert torch.allclose(grey_levels(imgs), imgs.float() / 127.5 - 1)
    prepared = prepare_batch(imgs, "discretized_gaussian", torch.Generator())
    assert torch.equal(prepared, grey_levels(imgs))
    with pytest.raises(ValueError, match="uint8"):
        grey_levels(imgs.float())


def test_discretized_gaussian_floors_every_bin_at_1e_12():
    """A confident miss costs at most -log(1e-12) nats in every bin, the open edge bins included (without the
    floor, a black pixel predicted white with sigma 1e-3 would cost ~2e6 nats), and the gradient stays finite."""
    mean = torch.tensor([0.9, -0.9, 0.9, -0.5], requires_grad=True)
    x = torch.tensor([-1.0, 1.0, 0.0, -0.5])
    logp = discretized_gaussian_log_likelihood(x, mean, torch.full((4,), math.log(1e-3)))
    assert torch.allclose(logp[:3], torch.full((3,), math.log(1e-12)))
    assert -1e-3 < logp[3].item() <= 0                        # a hit keeps almost all its probability
    logp.sum().backward()
    assert torch.isfinite(mean.grad).all()
    unclamped = torch.special.log_ndtr(torch.tensor((-1.0 - 0.9 + 1 / 255) / 1e-3))
    assert unclamped < -1e6                                   # what the floor prevents


def test_binarize_and_dequantize():
    imgs = torch.tensor([[0, 255, 128, 64]], dtype=torch.uint8)
    assert torch.equal(binarize(imgs, "threshold"), torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    a = binarize(imgs.expand(20_000, 4), "stochastic", torch.Generator().manual_seed(0))
    b = binarize(imgs.expand(20_000, 4), "stochastic", torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(a.mean(0), imgs[0].float() / 255, atol=0.015)
    d = dequantize(imgs.expand(1000, 4), torch.Generator().manual_seed(0))
    assert ((d * 256).floor() == imgs.float()).all() and (d < 1).all()
    with pytest.raises(ValueError, match="mode"):
        binarize(imgs, "round")
    with pytest.raises(ValueError, match="uint8"):
        dequantize(imgs.float())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binarize(torch.tensor([2.0]))


def test_vae_shapes_and_elbo_terms():
    torch.manual_seed(0)
    for cfg in (VAEConfig(x_dim=20, hidden=16, n_hidden=2, z_dim=3),
                VAEConfig(x_dim=20, hidden=16, n_hidden=1, z_dim=3, likelihood="gaussian"),
                VAEConfig(x_dim=20, hidden=16, n_hidden=1, z_dim=3, likelihood="gaussian",
                          decoder_std=0.3),
                VAEConfig(x_dim=20, hidden=16, n_hidden=1, z_dim=3,
                          likelihood="discretized_gaussian")):
        model = VAE(cfg)
        grey = grey_levels(torch.randint(0, 256, (5, 20), dtype=torch.uint8))
        x = {"bernoulli": torch.rand(5, 20).round(), "gaussian": torch.rand(5, 20),
             "discretized_gaussian": grey}[cfg.likelihood]
        out = model(x, generator=torch.Generator().manual_seed(0))
        assert out["elbo"].shape == (5,) and out["z"].shape == (5, 3)
        assert torch.allclose(out["elbo"], out["rec"] - out["kl"])
        mu, lv = model.encode(x)
        z = reparameterize(mu, lv, torch.randn(5, 3, generator=torch.Generator().manual_seed(0)))
        assert torch.allclose(out["z"], z)
        assert torch.allclose(out["rec"], model.log_likelihood(x, z))
        if cfg.likelihood == "discretized_gaussian":
            mean, logvar = model.decode(z)
            ref = discretized_gaussian_log_likelihood(x, mean, 0.5 * logvar).sum(-1)
            assert torch.allclose(out["rec"], ref) and (out["rec"] <= 0).all()   # a log-probability
            assert torch.allclose(model.mean_image(z), (mean + 1) / 2)
        if cfg.likelihood == "gaussian":
            mean, logvar = model.decode(z)
            expected = 2 * math.log(0.3) if cfg.decoder_std else None
            if expected is not None:
                assert torch.allclose(logvar, torch.full_like(logvar, expected))
            else:
                assert (logvar >= cfg.min_logvar).all()
    with pytest.raises(ValueError, match="likelihood"):
        VAE(VAEConfig(likelihood="laplace"))


def test_iwae_bound_on_linear_gaussian_model():
    """In a linear-Gaussian model log p(x) is exact: L_1 = ELBO <= L_K <= log p(x), and L_K -> log p(x)."""
    torch.manual_seed(0)
    D, d, s = 4, 2, 0.6
    W, b, x = torch.randn(D, d, dtype=torch.float64), torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    log_px = MultivariateNormal(b, W @ W.T + s**2 * torch.eye(D, dtype=torch.float64)).log_prob(x).item()
    cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + W.T @ W / s**2)
    mean = cov @ W.T @ (x - b) / s**2

    class Toy(torch.nn.Module):
        def encode(self, xs):
            return mean.expand(len(xs), d), torch.full((len(xs), d), math.log(1.5), dtype=torch.float64)

        def log_likelihood(self, xs, z):
            return gaussian_log_density(xs, z @ W.T + b, torch.full_like(xs, 2 * math.log(s)))

    xs, g = x.expand(2000, D), torch.Generator().manual_seed(1)
    L = {K: iwae_bound(Toy(), xs, K, generator=g, chunk=200).mean().item() for K in (1, 10, 1000)}
    assert L[1] < L[10] < L[1000] < log_px + 1e-3
    assert log_px - L[1000] < 0.05 * (log_px - L[1])
    with pytest.raises(ValueError, match="K"):
        iwae_bound(Toy(), xs, 0)


def _toy_images(n=96, seed=0):
    """Two prototypes, the left or the right half of 16 pixels lit (255), with a few grey pixels: a structure
    a 2-D latent can capture, where a model without it pays about 16 log 2 nats per image."""
    g = torch.Generator().manual_seed(seed)
    side = torch.randint(0, 2, (n, 1), generator=g)
    left = (torch.arange(16) < 8)[None]
    images = torch.where(left == side.bool(), 255, 0)
    grey = torch.rand(n, 16, generator=g) < 0.1
    return torch.where(grey, 128, images).to(torch.uint8)


def test_training_improves_the_bound():
    X = _toy_images()
    X_eval = binarize(X[:32], "stochastic", torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = VAE(VAEConfig(x_dim=16, hidden=32, n_hidden=1, z_dim=2))
    before = evaluate_vae(model, X_eval)["neg_elbo"]
    h = train_vae(model, X, steps=150, batch_size=16, lr=1e-2, seed=0, X_eval=X_eval, eval_every=50)
    after = evaluate_vae(model, X_eval, K=20)
    assert after["neg_elbo"] < before - 3.0
    assert after["neg_iwae_20"] <= after["neg_elbo"] + 0.5
    assert [s for s, _ in h["eval"]] == [50, 100, 150] and len(h["train"]) == len(h["kl"]) == 150
    with pytest.raises(ValueError, match="uint8"):
        train_vae(model, X.float(), steps=1, batch_size=4, lr=1e-3, seed=0)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "discretized_gaussian"])
def test_train_vae_resumes_exactly(tmp_path, monkeypatch, likelihood):
    """A run killed mid-way and resumed from its last checkpoint ends with exactly the weights and history of an
    uninterrupted run: batches, binarization/dequantization and eps all come from per-step generators."""
    import groundup.vae as vae_module

    X = _toy_images()
    X_eval = prepare_batch(X[:16], likelihood, torch.Generator().manual_seed(0))
    cfg = VAEConfig(x_dim=16, hidden=12, n_hidden=1, z_dim=2, likelihood=likelihood)
    kw = dict(steps=40, batch_size=8, lr=5e-3, seed=3, X_eval=X_eval, eval_every=10, save_every=10)

    torch.manual_seed(0)
    straight = VAE(cfg)
    h1 = train_vae(straight, X, **kw)

    ckpt = tmp_path / "vae.safetensors"
    monkeypatch.setattr(vae_module, "progress", crashing_progress(25))
    torch.manual_seed(0)
    with pytest.raises(Crash):
        train_vae(VAE(cfg), X, **kw, checkpoint=ckpt)
    monkeypatch.undo()
    torch.manual_seed(123)            # a different init and random state: everything must come from the checkpoint
    torch.rand(7)
    resumed = VAE(cfg)
    h2 = train_vae(resumed, X, **kw, checkpoint=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert h1 == h2 and len(h2["train"]) == 40


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_keep_best_returns_the_weights_of_the_best_evaluation(tmp_path, with_checkpoint):
    """keep_best ends with the weights whose held-out -ELBO was lowest, not the last ones. Trained on black
    images and evaluated on white ones, the model gets worse at every evaluation: the best is the first."""
    X = torch.zeros(64, 16, dtype=torch.uint8)
    X_eval = prepare_batch(torch.full((8, 16), 255, dtype=torch.uint8), "discretized_gaussian", torch.Generator())
    cfg = VAEConfig(x_dim=16, hidden=12, n_hidden=1, z_dim=2, likelihood="discretized_gaussian")
    ckpt = tmp_path / "vae.safetensors" if with_checkpoint else None
    torch.manual_seed(0)
    model = VAE(cfg)
    h = train_vae(model, X, steps=60, batch_size=8, lr=1e-2, seed=0, X_eval=X_eval, eval_every=5,
                  keep_best=True, checkpoint=ckpt)
    best_step, best = h["best"]
    assert best_step == 5 and best == h["eval"][0][1] and best < h["eval"][-1][1] - 0.1
    assert evaluate_vae(model, X_eval)["neg_elbo"] == pytest.approx(best, rel=1e-6)   # the step-5 weights
    assert (tmp_path / "vae_best.safetensors").exists() == with_checkpoint
    with pytest.raises(ValueError, match="keep_best needs X_eval"):
        train_vae(VAE(cfg), X, steps=2, batch_size=8, lr=1e-3, seed=0, keep_best=True)


def test_iwae_evaluation_shows_progress_in_images(monkeypatch):
    """L_K costs K decoder passes per image: evaluate_vae shows a progress bar when K > 0 that counts
    images and moves more than once per evaluation batch (a bar over 1,000-image batches showed 1/1)."""
    import groundup.vae as vae_module

    bars = []

    class Recording:
        def __init__(self, iterable=None, **kwargs):
            self.kwargs, self.updates, self.closed = kwargs, [], False
            bars.append(self)

        def update(self, n):
            self.updates.append(n)

        def close(self):
            self.closed = True

    monkeypatch.setattr(vae_module, "progress", Recording)
    model = VAE(VAEConfig(x_dim=16, hidden=8, n_hidden=1, z_dim=2))
    X_eval = binarize(_toy_images(20), "stochastic", torch.Generator().manual_seed(0))
    evaluate_vae(model, X_eval, batch_size=8)
    assert bars == []
    evaluate_vae(model, X_eval, K=5, batch_size=8, iwae_batch=3)
    (bar,) = bars
    assert bar.kwargs["total"] == 20 and bar.kwargs["unit"] == "image" and bar.closed
    assert bar.updates == [3, 3, 2, 3, 3, 2, 3, 1]         # batches of 8, 8, 4 in groups of 3


def test_discretized_decoder_mean_is_bounded_to_the_data_range():
    # the open end bins of (15a) reward a mean below -1 without end; the decoder keeps it in (-1, 1)
    torch.manual_seed(0)
    model = VAE(VAEConfig(hidden=8, n_hidden=1, z_dim=2, likelihood="discretized_gaussian"))
    with torch.no_grad():
        model.decoder[-1].bias.fill_(-50.0)                     # a network pushing every output far below -1
        mean, logvar = model.decode(torch.randn(4, 2))
    assert mean.shape == logvar.shape == (4, 784)
    assert (mean >= -1).all() and (mean <= 1).all()
    gauss = VAE(VAEConfig(hidden=8, n_hidden=1, z_dim=2, likelihood="gaussian"))
    with torch.no_grad():
        gauss.decoder[-1].bias.fill_(-50.0)                     # the density's mean is not bounded
        assert (gauss.decode(torch.randn(4, 2))[0] < -1).all()
