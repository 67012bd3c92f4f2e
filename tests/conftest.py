import torch
import pytest

from ats.models import GaussianMixture


@pytest.fixture(scope="session")
def gmm() -> GaussianMixture:
    return GaussianMixture.random(4, 5, seed=3, std_range=(0.1, 0.4))


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The models here are small: a second thread adds little and, on a shared 2-core
    machine, can make the suite many times slower. Restored after the session."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
