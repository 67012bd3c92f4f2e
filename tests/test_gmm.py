
import pytest
import torch

from ats.models import GaussianMixture


def test_single_gaussian_posterior_mean_closed_form():
    mu, s = torch.tensor([[1., -2., 0.5]]), torch.tensor([[0.5, 1., 2.]])
    gmm = GaussianMixture(mu, s)
    y = torch.randn(10, 3, dtype=torch.float64)
    sigma = torch.rand(10, dtype=torch.float64) * 3
    expected = mu + s ** 2 / (s ** 2 + sigma[:, None] ** 2) * (y - mu)
    torch.testing.assert_close(gmm(y, sigma), expected.double())


def test_mixture_posterior_mean_by_quadrature():
    """1-D, two components: E[x0 | y] computed by numerical integration over x0."""
    gmm = GaussianMixture(torch.tensor([[-1.], [1.5]]), torch.tensor([0.3, 0.6]), torch.tensor([0.3, 0.7]))
    x0 = torch.linspace(-8, 8, 200001, dtype=torch.float64)
    prior = sum(w * torch.exp(-0.5 * ((x0 - m) / s) ** 2) / s
                for w, m, s in [(0.3, -1., 0.3), (0.7, 1.5, 0.6)])
    for y, sigma in [(0.2, 0.5), (-2., 1.3), (1., 0.05)]:
        post = prior * torch.exp(-0.5 * ((y - x0) / sigma) ** 2)
        expected = (post * x0).sum() / post.sum()
        got = gmm(torch.tensor([[y]], dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
        assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def test_sampling_matches_moments():
    gmm = GaussianMixture.random(3, 4, seed=2)
    x = gmm.sample(200000, generator=torch.Generator().manual_seed(0))
    w = gmm.log_weights.exp()
    mean = (w[:, None] * gmm.means).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.01)
    assert gmm.dim == 3 and x.shape == (200000, 3)


def test_denoiser_at_zero_noise_is_identity_and_float32():
    gmm = GaussianMixture.random(5, 3, seed=0)
    y = torch.randn(4, 5)
    out = gmm(y, torch.zeros(4))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, y)


def test_bad_parameters():
    with pytest.raises(ValueError, match="means must be"):
        GaussianMixture(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="must be positive"):
        GaussianMixture(torch.zeros(2, 3), torch.tensor([1., -1.]))
