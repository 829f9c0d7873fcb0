"""Compile the kernels for a CUDA GPU on a machine without one (ahead of time, no launch).

The interpreter checks the numbers; this checks that the GPU compiler accepts the same
code (layouts of `tl.interleave`/`tl.reshape`, `tl.dot` shapes, shared memory) and reports
what the machine code looks like: registers spilled to local memory and warp shuffles.

    TRITON_INTERPRET=0 python -m loralab_kernels.compile_check            # Hopper (sm_90)
    TRITON_INTERPRET=0 python -m loralab_kernels.compile_check --arch 80 --sass

Needs Triton's NVIDIA backend (the pip wheel ships `ptxas`); no GPU, no CUDA driver.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time


def _arg_types(dq: bool, act: str, out: str) -> dict[str, str]:
    """Triton signature types of every non-constexpr kernel argument."""
    return {"packed_ptr": "*u8", "code_ptr": "*fp32", "absmax_ptr": "*u8" if dq else "*fp32",
            "nested_code_ptr": "*fp32", "nested_absmax_ptr": "*fp32", "offset_ptr": "*fp32",
            "x_ptr": f"*{act}", "gy_ptr": f"*{act}", "bias_ptr": f"*{act}", "out_ptr": f"*{out}",
            "M": "i32", "N": "i32", "K": "i32", "numel": "i64", "nbytes": "i64",
            "stride_xm": "i32", "stride_om": "i32", "stride_os": "i32", "stride_gm": "i32"}


def _segmented_types(act: str, out: str) -> dict[str, str]:
    """Argument types of the segmented LoRA kernels (loralab_kernels/segmented.py)."""
    return {"x_ptr": f"*{act}", "a_ptr": f"*{act}", "b_ptr": f"*{act}", "h_ptr": "*fp32", "y_ptr": f"*{out}",
            "scale_ptr": "*fp32", "order_ptr": "*i64", "seg_start_ptr": "*i32", "seg_lora_ptr": "*i32",
            "row_lora_ptr": "*i32", "K": "i32", "N": "i32", "R": "i32", "stride_xm": "i32",
            "stride_al": "i32", "stride_ar": "i32", "stride_hm": "i32", "stride_bl": "i32",
            "stride_bn": "i32", "stride_ym": "i32"}


def variants() -> list[tuple[str, str, dict, dict, int]]:
    """(name, kernel, constexprs, argument types, num_warps) of representative launches."""
    q = dict(BLOCKSIZE=64, NESTED_BLOCKSIZE=256, DOUBLE_QUANT=True)
    bf16, f32 = _arg_types(True, "bf16", "bf16"), _arg_types(True, "bf16", "fp32")
    return [
        ("dequant", "dequant", dict(q, ROWS=128, COLS=32), bf16, 4),
        ("gemv M=1, 1-row", "gemv", dict(q, HAS_BIAS=True, DOT_FP32=False, BLOCK_M=1, BLOCK_N=64,
                                         BLOCK_K=256, GROUPS=4, SPLIT_K=1), bf16, 4),
        ("gemv split-K, tl.dot", "gemv", dict(q, HAS_BIAS=False, DOT_FP32=False, BLOCK_M=16,
                                              BLOCK_N=64, BLOCK_K=128, GROUPS=2, SPLIT_K=4), f32, 4),
        ("gemm", "gemm", dict(q, HAS_BIAS=True, DOT_FP32=False, BLOCK_M=128, BLOCK_N=128,
                              BLOCK_K=64, GROUPS=1, GROUP_M=8), bf16, 8),
        ("grad_input", "grad_input", dict(q, DOT_FP32=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128,
                                          GROUPS=2, GROUP_M=8), bf16, 8),
        ("gemm fp32 (ieee dot)", "gemm", dict(q, HAS_BIAS=False, DOT_FP32=True, BLOCK_M=64,
                                              BLOCK_N=64, BLOCK_K=64, GROUPS=1, GROUP_M=8),
         _arg_types(True, "fp32", "fp32"), 4),
        ("lora shrink (segmented)", "shrink", dict(DOT_FP32=False, BLOCK_M=16, BLOCK_R=16, BLOCK_K=64),
         _segmented_types("bf16", "bf16"), 4),
        ("lora expand (segmented)", "expand", dict(DOT_FP32=False, BLOCK_M=16, BLOCK_N=64, BLOCK_R=16),
         _segmented_types("bf16", "bf16"), 4),
        ("lora shrink fp32 (ieee)", "shrink", dict(DOT_FP32=True, BLOCK_M=16, BLOCK_R=64, BLOCK_K=64),
         _segmented_types("fp32", "fp32"), 4),
        ("lora shrink (gather)", "shrink_gather", dict(BLOCK_R=16, BLOCK_K=128), _segmented_types("fp16", "fp16"), 4),
        ("lora expand (gather)", "expand_gather", dict(BLOCK_N=128, BLOCK_R=16), _segmented_types("fp16", "fp16"), 4),
    ]


def _kernels() -> dict:
    from .dequant import _dequant_kernel
    from .grad import _grad_input_kernel
    from .matmul import _gemm_kernel, _gemv_kernel
    from .segmented import (
        _expand_gather_kernel,
        _expand_kernel,
        _shrink_gather_kernel,
        _shrink_kernel,
    )

    return {"dequant": _dequant_kernel, "gemv": _gemv_kernel, "gemm": _gemm_kernel,
            "grad_input": _grad_input_kernel, "shrink": _shrink_kernel, "expand": _expand_kernel,
            "shrink_gather": _shrink_gather_kernel, "expand_gather": _expand_gather_kernel}


def sass_counts(cubin: bytes) -> collections.Counter:
    """Instruction counts by opcode, from Triton's bundled `cuobjdump`."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    ops = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def compile_all(arch: int = 90, sass: bool = False) -> list[str]:
    """Compile every variant for `sm_<arch>`; returns one line per variant (raises on failure)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = _kernels()
    lines = []
    for name, kind, consts, types, warps in variants():
        fn = kernels[kind]
        signature = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
        constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        # As at a launch with round sizes: Triton marks pointers and integers divisible by 16.
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a not in consts and a != "M"}
        t0 = time.time()
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": 3})
        line = (f"{name:24s} sm_{arch}: ok in {time.time() - t0:4.1f} s, "
                f"shared memory {compiled.metadata.shared} B")
        if sass:
            ops = sass_counts(compiled.asm["cubin"])
            line += (f", {sum(ops.values())} instructions, spills {ops['STL']} stores / "
                     f"{ops['LDL']} loads, {ops['SHFL']} shuffles")
        lines.append(line)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 (90 = Hopper)")
    p.add_argument("--sass", action="store_true", help="also count spills and shuffles")
    a = p.parse_args(argv)
    for line in compile_all(a.arch, a.sass):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
