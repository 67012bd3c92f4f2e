import pytest
import torch

from ats.losses import get_loss, l2_loss, pseudo_huber_loss
from ats.metrics import Coordinates, frechet_distance, frechet_metric, to_uint8
from ats.models import GaussianMixture
from ats.models.digits import digits_metric
from ats.models.gmm import gmm_metric
from ats.models.digits import load_digits_data


def test_quantization_is_fixed_not_min_max():
    x = torch.tensor([-2., -1., -0.5, 0., 0.999, 1., 3.]).reshape(1, 1, 1, 7)
    assert to_uint8(x).flatten().tolist() == [0, 0, 64, 128, 255, 255, 255]
    dark = torch.full((1, 1, 2, 2), -0.5)
    assert to_uint8(dark).unique().tolist() == [64]  # a min-max rescale would make it black or white


def test_gmm_frechet_distance_against_exact_sample():
    gmm = GaussianMixture.random(8, 4, seed=0)
    metric = gmm_metric(gmm, n_reference=50000)
    exact = frechet_distance(metric, gmm.sample(5000, generator=torch.Generator().manual_seed(1)))
    shifted = frechet_distance(metric, gmm.sample(5000, generator=torch.Generator().manual_seed(1)) + 0.2)
    assert exact < 0.05 and shifted == pytest.approx(exact + 8 * 0.04, rel=0.2)
    # The metric keeps its real side across evaluations.
    assert frechet_distance(metric, gmm.sample(5000, generator=torch.Generator().manual_seed(1))) == exact


def test_digits_fid_real_vs_noise():
    metric = digits_metric()
    images, _ = load_digits_data()
    assert frechet_distance(metric, images) < 1e-6
    assert frechet_distance(metric, images[:900]) < 0.1 * frechet_distance(metric, torch.rand(900, 1, 8, 8) * 2 - 1)


def test_nan_samples_are_refused():
    metric = frechet_metric(Coordinates(2))
    metric.update(torch.randn(10, 2), real=True)
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(metric, torch.tensor([[0., float("nan")]] * 3))


def test_losses():
    x, y = torch.zeros(2, 3, 4), torch.ones(2, 3, 4)
    torch.testing.assert_close(l2_loss(x, y), torch.full((2,), 12 ** 0.5))
    c = 0.00054 * 12 ** 0.5
    torch.testing.assert_close(pseudo_huber_loss(x, y), torch.full((2,), (12 + c * c) ** 0.5 - c))
    assert get_loss("l2") is l2_loss and get_loss("pseudo_huber") is pseudo_huber_loss
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        get_loss("l1")
    with pytest.raises(ValueError, match="loss 'lpips'|LPIPS weights"):
        get_loss("lpips")
