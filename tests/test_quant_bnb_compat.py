"""Bit-for-bit compatibility with bitsandbytes' 4-bit format (its quantize/dequantize run on CPU)."""
import logging
from pathlib import Path

import pytest
import torch

import loralab_kernels  # noqa: F401  # loaded first: it must not break `import bitsandbytes`
from quant import dequantize_4bit, quantize_4bit
from quant.compat import from_bitsandbytes, to_bitsandbytes

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

# Linear-weight shapes (last dim a multiple of the blocksize) plus odd numel and odd rows.
CASES = [
    ((96, 128), torch.float32, "nf4", 64, True),
    ((96, 128), torch.bfloat16, "nf4", 64, False),
    ((64, 256), torch.float16, "fp4", 128, True),
    ((600, 64), torch.float32, "nf4", 32, True),  # 1200 absmax values: 5 nested blocks, one partial
    ((5, 2048), torch.bfloat16, "fp4", 1024, True),
]


def test_import_bitsandbytes_next_to_project_kernels():
    """No module of this project takes the top-level name `kernels`: that is Hugging Face's
    package, which bitsandbytes tries and transformers requires, and a module of ours under
    that name would be imported in its place."""
    import importlib.util

    root = Path(loralab_kernels.__file__).resolve().parents[1]
    for folder in (root, root / "benchmarks", root / "examples", root / "tests"):  # script folders
        assert not (folder / "kernels").exists() and not (folder / "kernels.py").exists(), folder
    spec = importlib.util.find_spec("kernels")  # installed: Hugging Face's, in site-packages
    assert spec is None or {"site-packages", "dist-packages"} & set(Path(spec.origin).parts), spec
    assert callable(bnbf.quantize_4bit)


@pytest.mark.parametrize("shape,dtype,quant_type,blocksize,dq", CASES)
def test_same_bytes_and_absmax(shape, dtype, quant_type, blocksize, dq):
    g = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(shape, generator=g) * 2).to(dtype)
    w[0, :blocksize // 2] = 0
    packed, state = quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=dq)
    bpacked, bstate = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq,
                                         quant_type=quant_type)
    assert torch.equal(packed, bpacked.reshape(-1))
    assert torch.equal(state.absmax, bstate.absmax)
    assert torch.equal(state.code, bstate.code)
    if dq:
        assert torch.equal(state.offset, bstate.offset)
        assert torch.equal(state.nested_absmax, bstate.state2.absmax)
        assert torch.equal(state.nested_code, bstate.state2.code)

    # ours -> bitsandbytes' dequantize, and bitsandbytes' -> ours: identical tensors
    ours = dequantize_4bit(packed, state)
    theirs = bnbf.dequantize_4bit(*to_bitsandbytes(packed, state))
    assert torch.equal(ours, theirs.reshape(shape))
    assert torch.equal(dequantize_4bit(*from_bitsandbytes(bpacked, bstate)), ours)


def test_odd_numel_bytes_match():
    # numel 9 * 41 = 369 (odd): the pad nibble and the partial last block.
    w = torch.randn(9, 41, generator=torch.Generator().manual_seed(9))
    packed, state = quantize_4bit(w, blocksize=64, double_quant=True)
    bpacked, bstate = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(packed, bpacked.reshape(-1)) and torch.equal(state.absmax, bstate.absmax)
    assert torch.equal(state.nested_absmax, bstate.state2.absmax)
    assert torch.equal(dequantize_4bit(*from_bitsandbytes(bpacked, bstate)), dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", [(96, 160), (64, 96), (7, 100)])
def test_rows_that_are_not_whole_blocks(shape):
    """Blocks run over the flattened weight, across row ends (160 = 2.5 blocks of 64): the bytes
    and absmax equal bitsandbytes', and bitsandbytes' state decodes here to the float64
    reference `code[q] * absmax[i // 64]`. (bitsandbytes 0.50.2's own CPU dequantize is not
    compared for these shapes: it returns other values for most of them, relative error 0.26
    against 0.09 on (96, 160), while the codes and absmax it reads are these.)"""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
    packed, state = quantize_4bit(w, blocksize=64, double_quant=False)
    bpacked, bstate = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(packed, bpacked.reshape(-1)) and torch.equal(state.absmax, bstate.absmax)
    q = torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[: w.numel()].long()  # high nibble first
    block = torch.arange(w.numel()) // 64
    # the product of two float32 values is exact in float64 (24 + 24 significand bits < 53), so
    # one rounding to float32 gives the correctly rounded float32 product: equality, no tolerance
    reference = (state.code.double()[q] * state.absmax.double()[block]).float().reshape(shape)
    got = dequantize_4bit(*from_bitsandbytes(bpacked, bstate))
    assert torch.equal(got, reference)
