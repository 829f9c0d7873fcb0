"""The live-tensor peak tracker the training benchmark uses (benchmarks/live_memory.py):
its peaks are checked against byte counts worked out by hand, so a tracker that forgets to
subtract freed storages, counts views twice or misses pre-existing tensors fails."""
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from benchmarks.live_memory import LivePeak

MB = 4 * 256 * 1024  # bytes of one (256, 1024) float32 tensor


def test_freed_storages_are_subtracted():
    x = torch.randn(256, 1024)
    with LivePeak(x) as mem:
        for _ in range(5):
            y = x * 2  # the previous y is freed when y is rebound
        del y
    # x, plus at most two y's at once (the new one exists before the old one is released)
    assert mem.peak == 3 * MB
    assert mem.current == MB  # only x is left


def test_views_share_their_storage():
    x = torch.randn(256, 1024)
    with LivePeak() as mem:
        y = x + 1
        views = [y[i::2] for i in range(2)] + [y.t(), y.view(-1)]
    assert mem.peak == MB and len(views) == 4  # one new storage, however many views


def test_existing_parameters_gradients_and_states_count():
    lin = nn.Linear(1024, 256, bias=False)  # weight: (256, 1024) float32
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.randn(4, 1024)).sum().backward()
    opt.step()  # gradient and momentum buffer now exist, both weight-sized
    assert LivePeak(lin, opt).current == 3 * MB


def test_checkpointing_lowers_the_measured_peak():
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512))
                           for _ in range(6)).requires_grad_(False)  # frozen, as under LoRA
    x = torch.randn(128, 512, requires_grad=True)

    def peak(ckpt: bool) -> int:
        with LivePeak(blocks, x) as mem:
            h = x
            for b in blocks:
                h = checkpoint(b, h, use_reentrant=False) if ckpt else b(h)
            h.sum().backward()
        x.grad = None
        return mem.peak

    plain, ckpt = peak(False), peak(True)
    # Frozen linears save no input for the input gradient; GELU saves its (128, 2048) input,
    # A = 1 MiB per block, all six alive at the end of the plain forward. Checkpointing keeps
    # the (128, 512) block inputs and, while one block is recomputed, at most its GELU input
    # and output and the gradient flowing in (3 A): the peaks differ by at least 6 A - 3 A.
    A = 128 * 2048 * 4
    assert plain - ckpt >= 6 * A - 3 * A, (plain, ckpt)


def test_owners_must_be_tensors_modules_or_optimizers():
    with pytest.raises(TypeError, match="owners"):
        LivePeak("model")


def test_transient_bytes_count_at_their_call():
    x = torch.randn(256, 1024)
    held = lambda func, args: 5 * MB if func is torch.ops.aten.mul.Tensor else 0  # noqa: E731
    with LivePeak(x, transient=held) as mem:
        y = x * 2
    assert mem.peak == MB + 5 * MB and y.shape == x.shape  # the 5 MB on top of x, not of y


def test_fused_4bit_linear_holds_its_dequantized_weight():
    """benchmarks/training.py reads the weight shape from the op's arguments by position;
    this fails if quant/ops.py's schema moves it."""
    from benchmarks.training import fused_transient_bytes
    from quant import Linear4bit

    layer = Linear4bit.from_linear(nn.Linear(320, 192), compute_dtype=torch.float32)
    x = torch.randn(3, 320, requires_grad=True)
    seen = []

    def spy(func, args):
        seen.append(fused_transient_bytes(func, args))
        return seen[-1]
    with LivePeak(layer, x, transient=spy):
        layer(x).sum().backward()
    assert sorted(b for b in seen if b) == [192 * 320 * 4] * 2  # forward and input gradient
