import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Every op test runs on the CPU; the same cases run on CUDA where a GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")])]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on 2 cores shared with a training job, 2 threads run ~5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
