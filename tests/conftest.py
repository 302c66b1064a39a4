import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Every op test runs on the CPU; the same cases run on CUDA where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")])]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
