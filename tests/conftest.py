import os

# Triton kernels run on CPU tensors only under its interpreter; set it before triton is imported.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
