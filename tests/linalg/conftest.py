import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny problems: one thread (on a busy machine, two spinning threads are ~1000× slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
