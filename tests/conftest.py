import os

import pytest
import torch

# Triton kernels run on CPU tensors only under its interpreter; set it before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread for the suite: its matmuls are small and gain little from two, and on
    a busy CPU (or beside a test's own subprocesses) OpenMP barriers slow them 20-60x.
    Tests of multi-threaded code paths set their own count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
