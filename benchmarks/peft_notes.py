"""Where PEFT 0.21 gets a layer type wrong: each case measured for PEFT and for loralab against a
float64 dense reference, from the same adapter weights (loralab's file, loaded by PEFT).

* mha: `nn.MultiheadAttention` with LoRA on in_proj and out_proj. Reference: the attention run
  with `in_proj_weight + s B A` and `out_proj.weight + s B' A'` in float64. PEFT adds the
  out_proj update twice in forward.
* encoder_eval: an `nn.TransformerEncoderLayer` with LoRA on linear1 / linear2, in eval mode
  (PyTorch's fused fast path) against the same model in train mode (dropout 0: the same math).
  PEFT's adapters are skipped by the fused path.
* conv_dilation: a dilated `nn.Conv2d`: whether the forward runs (1) or fails (0); PEFT's
  lora_A ignores the dilation, so its output has the wrong size.

    python benchmarks/peft_notes.py      # a few seconds

Writes benchmarks/results/peft_notes.csv (metric relative_error = ||out - ref|| / ||ref||).
"""
from __future__ import annotations

import copy
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, make_row, write_rows  # noqa: E402
from lora import LoRAConfig, apply_lora, save_adapter  # noqa: E402


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _randomize_b(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _peft_from(base: nn.Module, folder: str) -> nn.Module:
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def mha_rows(tmp: str) -> list[dict]:
    torch.manual_seed(0)
    base = _Attn().eval()
    ours = copy.deepcopy(base)
    apply_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["attn"]))
    _randomize_b(ours, 1)
    x = torch.randn(3, 5, 16)
    layer = ours.attn
    ref_model = copy.deepcopy(base).double()
    with torch.no_grad():
        s = layer.scaling["default"]
        ref_model.attn.in_proj_weight += s * (layer.lora_B["default"].weight.double()
                                              @ layer.lora_A["default"].weight.double())
        op = layer.out_proj_lora
        ref_model.attn.out_proj.weight += s * (op.lora_B["default"].weight.double()
                                               @ op.lora_A["default"].weight.double())
        ref = ref_model(x.double())
        save_adapter(ours, tmp)
        theirs = _peft_from(base, tmp)
        shape = "embed 16, 2 heads, r 4"
        return [make_row("peft_notes", "loralab", shape, "mha_relative_error", _rel(ours(x), ref), "ratio"),
                make_row("peft_notes", "peft", shape, "mha_relative_error", _rel(theirs(x), ref), "ratio")]


def encoder_rows() -> list[dict]:
    import peft
    torch.manual_seed(0)
    base = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)).eval()
    x = torch.randn(3, 5, 16)
    rows = []
    for provider in ("loralab", "peft"):
        if provider == "loralab":
            model = copy.deepcopy(base)
            apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["linear1", "linear2"]))
        else:
            model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                            target_modules=["linear1", "linear2"]))
        _randomize_b(model, 2)
        with torch.no_grad():
            model.train()
            train_mode = model(x)
            model.eval()
            eval_mode = model(x)
        rows.append(make_row("peft_notes", provider, "d 16, ffn 32", "encoder_eval_relative_error",
                             _rel(eval_mode, train_mode), "ratio"))
    return rows


def conv_rows() -> list[dict]:
    import peft
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, dilation=2))
    x = torch.randn(1, 3, 8, 8)
    rows = []
    for provider in ("loralab", "peft"):
        if provider == "loralab":
            model = copy.deepcopy(base)
            apply_lora(model, LoRAConfig(r=2, target_modules=["0"]))
        else:
            model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0"]))
        try:
            with torch.no_grad():
                model(x)
            runs = 1.0
        except RuntimeError:
            runs = 0.0
        rows.append(make_row("peft_notes", provider, "3x3, dilation 2", "conv_dilation_forward_runs", runs, "bool"))
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = mha_rows(tmp) + encoder_rows() + conv_rows()
    path = write_rows(RESULTS_DIR / "peft_notes.csv", rows)
    for row in rows:
        print(f"{row['metric']:32s} {row['provider']:8s} {row['value']:.3g}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
