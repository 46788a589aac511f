import os

import pytest
import torch

# one thread per xdist worker: two workers on two cores must not oversubscribe
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from cases import LIVE_MODELS, assert_untouched

# the references are float64 and the float32 tolerances assume IEEE float32 arithmetic: cuDNN's
# default TF32 convolutions (10-bit mantissa) would miss them on CUDA
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def untouched_models():
    """Every model a test built through ``cases`` must be exactly as it was, even after raises."""
    LIVE_MODELS.clear()
    yield
    for model, before in LIVE_MODELS:
        assert_untouched(model, before)
    LIVE_MODELS.clear()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
