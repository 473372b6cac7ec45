import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small nets run fastest on one thread (and do not fight the other test worker)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
