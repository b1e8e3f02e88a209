import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model gains nothing from threads, and on a loaded 2-core machine they spin: 1.4 s becomes 80 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
