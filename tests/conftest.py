import torch
import pytest

from ats.models import GaussianMixture


@pytest.fixture(scope="session")
def gmm() -> GaussianMixture:
    return GaussianMixture.random(4, 5, seed=3, std_range=(0.1, 0.4))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
