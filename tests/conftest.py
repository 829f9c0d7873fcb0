import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Triton kernels run on CPU tensors only under its interpreter; set it before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A private inductor cache for each run. PyTorch's default, /tmp/torchinductor_<user>, is
# shared by every run on the machine, and its keys leave out the vector ISA that
# ATEN_CPU_CAPABILITY selects: kernels cached by an AVX-512 run, reused under
# ATEN_CPU_CAPABILITY=avx2 (`make test-portable`), gave wrong outputs (off by 2.8) and crashed.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _inductor_cache = tempfile.mkdtemp(prefix="loralab-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache
    atexit.register(shutil.rmtree, _inductor_cache, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread for the suite: its matmuls are small and gain little from two, and on
    a busy CPU (or beside a test's own subprocesses) OpenMP barriers slow them 20-60x.
    Tests of multi-threaded code paths set their own count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A tiny random two-block Llama GGUF file (blocksize 64 divides every width) for the
    fine-tuning pipeline's tests; test_own_data.py overrides it with a one-block model."""
    pytest.importorskip("gguf")
    from test_llama_gguf import write_tiny_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, dim=64, n_layers=2, n_heads=4, n_kv=2, ffn=128)
    return path
