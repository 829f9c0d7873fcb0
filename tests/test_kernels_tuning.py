"""The tile tuner: candidates from one function, pinning, timing each valid candidate once
per problem key, skipping tiles that fail. Timing is faked (no GPU): the logic is tested."""
import pytest
import torch

pytest.importorskip("triton")
import triton.testing  # noqa: E402

from loralab_kernels import matmul_4bit, matmul_4bit_grad_input, tuning  # noqa: E402
from loralab_kernels.tuning import KINDS, TileConfig, candidate_configs, pick_config, pin_config  # noqa: E402
from quant import dequantize_4bit, quantize_4bit  # noqa: E402


@pytest.fixture
def fake_gpu_timing(monkeypatch):
    """Pretend the interpreter is off for the tuner and time each launch as 1 ms."""
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(tuning, "_CHOSEN", {})
    timed = []

    def fake_do_bench(fn, warmup=25, rep=100, **kw):
        fn()
        timed.append(1)
        return float(len(timed))  # later candidates look slower: the first valid one wins

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    return timed


@pytest.mark.parametrize("kind", KINDS)
def test_candidates_are_valid_tiles(kind):
    configs = candidate_configs(kind)
    assert configs and len(set(configs)) == len(configs)
    for c in configs:
        assert c.block_k >= 32 and c.block_k & (c.block_k - 1) == 0
        assert c.block_n >= 16 and c.block_m in (1, 16) + (32, 64, 128, 256)


def test_each_key_is_timed_once_and_cached(fake_gpu_timing):
    launched = []
    valid = lambda c: c.split_k == 1  # noqa: E731
    first = pick_config("gemv", ("k1",), launched.append, valid)
    n_valid = sum(valid(c) for c in candidate_configs("gemv"))
    assert len(launched) == n_valid and first == [c for c in candidate_configs("gemv") if valid(c)][0]
    assert pick_config("gemv", ("k1",), launched.append, valid) == first
    assert len(launched) == n_valid  # cached: nothing timed again
    pick_config("gemv", ("k2",), launched.append, valid)
    assert len(launched) == 2 * n_valid


def test_failing_tiles_are_skipped_and_total_failure_is_clear(fake_gpu_timing):
    bad = candidate_configs("gemm")[0]

    def launch(c):
        if c == bad:
            raise RuntimeError("out of shared memory")

    assert pick_config("gemm", ("a",), launch) == candidate_configs("gemm")[1]

    def always_fails(c):
        raise RuntimeError("out of shared memory")

    with pytest.raises(RuntimeError, match="no gemm configuration ran"):
        pick_config("gemm", ("b",), always_fails)


def test_pinned_config_skips_timing(fake_gpu_timing):
    cfg = TileConfig(block_m=16, block_n=32, block_k=64)
    with pin_config("grad_input", cfg):
        assert pick_config("grad_input", ("c",), lambda c: 1 / 0) == cfg
    assert fake_gpu_timing == []


def test_tuned_launchers_give_correct_results(fake_gpu_timing):
    """The launchers' own filters leave candidates for small M (17 rows: GEMM and grad)."""
    packed, state = quantize_4bit(torch.randn(40, 64), double_quant=True)
    w = dequantize_4bit(packed, state, dtype=torch.float32).double()
    x = torch.randn(17, 64)
    torch.testing.assert_close(matmul_4bit(x, packed, state).double(), x.double() @ w.T,
                               atol=1e-4, rtol=1e-4)
    gy = torch.randn(17, 40)
    torch.testing.assert_close(matmul_4bit_grad_input(gy, packed, state).double(), gy.double() @ w,
                               atol=1e-4, rtol=1e-4)
    assert len(tuning.chosen_configs()) == 2
