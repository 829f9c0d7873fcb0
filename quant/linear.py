"""`Linear4bit` (alias `LinearNF4`): a frozen linear layer whose weight is stored in 4 bits (QLoRA sec. 3).

The layer holds the packed codes and the quantization state as buffers (so `.to()` and
`state_dict()` work) and computes `y = x @ W.T + b` in a compute dtype (bfloat16 by
default), dequantizing W on the fly, in one call of the `loralab::linear_4bit` op
(quant/ops.py), whose kernel is picked by the input's device. Its backward gives the input gradient by
dequantizing W again, so no full-precision copy of W is kept between forward and
backward: the memory saving that lets QLoRA fine-tune a 65B model on one GPU.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable

import torch
from torch import nn

from .blockwise import (
    FLOAT_DTYPES,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    check_blocksize,
    check_weight,
    quantize_4bit,
)
from .codes import code_revision, shared_code
from .module_paths import name_matches, set_submodule
from .ops import dequantize_4bit, linear_4bit
from .state import QuantState


def _check_compute_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    if compute_dtype not in FLOAT_DTYPES:
        raise ValueError(f"compute_dtype must be torch.bfloat16, torch.float16 or torch.float32, "
                         f"got {compute_dtype!r}")
    return compute_dtype


class Linear4bit(nn.Module):
    """A frozen linear layer with a 4-bit (NF4 by default, or FP4/INT4) weight.

    Args:
        in_features, out_features: layer sizes.
        bias: whether to hold a (frozen) bias.
        weight: optional `(out_features, in_features)` float weight to quantize; default
            nn.Linear's kaiming-uniform initialization.
        quant_type: "nf4" (QLoRA's NormalFloat), "fp4" or "int4"; or "nf3", "nf2", "int3", "int2"
            (fewer levels, still stored in 4 bits: `storage_bytes` is the same as NF4's).
        blocksize: weights per absmax block (64 in QLoRA sec. 3).
        double_quant: 8-bit quantize the absmax values too (QLoRA sec. 3; ~0.37 bits saved per parameter).
        compute_dtype: dtype of the matmul: bfloat16 (default, QLoRA's) or float32/float16.

    Buffers: `weight_packed` ((n + 1) // 2,) uint8, `absmax`, and with double quantization
    `offset`, `nested_absmax`; non-persistent `code_book`, `nested_code_book`: the code books, one
    tensor per device shared by every layer (`quant.codes.shared_code`).
    Shapes: x (..., in_features) -> (..., out_features), in x's dtype.

    Input: x must be a floating-point tensor (float32, bfloat16, float16 or float64) on the
    layer's device; it is cast to `compute_dtype` for the matmul and the result cast back,
    so a float64 x gets float64 outputs computed at `compute_dtype` precision (as a float32
    x with the default bfloat16 compute). Integer, bool and complex inputs raise TypeError.
    `load_state_dict` accepts buffers of exactly the layer's dtypes and shapes only.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight: torch.Tensor | None = None, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        check_blocksize(blocksize)
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, bool(double_quant)
        self.compute_dtype = _check_compute_dtype(compute_dtype)
        if weight is None:
            weight = torch.empty(out_features, in_features, device=device)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default
        else:
            self._check_new_weight(weight)
            want = None if device is None else torch.device(device)
            if want is not None and (want.type != weight.device.type
                                     or want.index not in (None, weight.device.index)):
                raise ValueError(f"device={device!r} differs from weight's device {weight.device}; "
                                 f"pass one of them, or move weight first")
        self.weight_dtype = weight.dtype
        self._quantize_into_buffers(weight.detach())
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=weight.device, dtype=weight.dtype),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def _quantize_into_buffers(self, weight: torch.Tensor) -> None:
        packed, state = quantize_4bit(weight, self.quant_type, self.blocksize, self.double_quant)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code_book", shared_code(self.quant_type, packed.device), persistent=False)
        if self.double_quant:
            self.register_buffer("offset", state.offset)
            self.register_buffer("nested_absmax", state.nested_absmax)
            self.register_buffer("nested_code_book", shared_code("dynamic8", packed.device), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = True, compute_dtype: torch.dtype = torch.bfloat16) -> "Linear4bit":
        """Quantize an `nn.Linear` (its weight and bias are copied, the original is untouched)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    weight=linear.weight.detach(), quant_type=quant_type, blocksize=blocksize,
                    double_quant=double_quant, compute_dtype=compute_dtype)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def _check_new_weight(self, weight: torch.Tensor) -> None:
        """A weight to quantize: float32/float16/bfloat16 of shape (out_features, in_features)."""
        check_weight(weight, "weight")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight must have shape ({self.out_features}, {self.in_features}), "
                             f"got {tuple(weight.shape)}")

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the quantization of `weight` ((out_features, in_features), float)."""
        self._check_new_weight(weight)
        device = self.weight_packed.device
        self._quantize_into_buffers(weight.detach().to(device))

    @property
    def quant_state(self) -> QuantState:
        """The `QuantState` of the weight, built from the buffers (shares their storage)."""
        device = self.weight_packed.device
        code = self.code_book if self.code_book.device == device else shared_code(self.quant_type, device)
        state = QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                           dtype=self.weight_dtype, blocksize=self.blocksize, quant_type=self.quant_type,
                           code=code)
        if self.double_quant:
            state.offset = self.offset
            state.nested_absmax = self.nested_absmax
            state.nested_code = self.nested_code_book if self.nested_code_book.device == device \
                else shared_code("dynamic8", device)
            state.nested_blocksize = NESTED_BLOCKSIZE
        return state

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense `(out_features, in_features)` weight (default dtype: the original weight's)."""
        return dequantize_4bit(self.weight_packed, self.quant_state, dtype=dtype or self.weight_dtype)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:  # an int x would come back as truncated integers
            raise TypeError(f"x must be a floating-point tensor (float32, bfloat16, float16 or "
                            f"float64), got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension in_features={self.in_features}, got {tuple(x.shape)}")
        if x.device != self.weight_packed.device:
            raise ValueError(f"x is on {x.device} but the layer is on {self.weight_packed.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = linear_4bit(x.to(self.compute_dtype), self.weight_packed, self.quant_state, bias)  # one op call
        return y.to(x.dtype)

    def _expected_buffers(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """(dtype, shape) of each persistent buffer, from the layer's configuration."""
        n = self.in_features * self.out_features
        nblocks = -(-n // self.blocksize)
        expected = {"weight_packed": (torch.uint8, ((n + 1) // 2,)),
                    "absmax": (torch.uint8 if self.double_quant else torch.float32, (nblocks,))}
        if self.double_quant:
            expected["offset"] = (torch.float32, ())
            expected["nested_absmax"] = (torch.float32, (-(-nblocks // NESTED_BLOCKSIZE),))
        return expected

    def format_tag(self) -> str:
        """"type:blocksize:double_quant", plus ":revision" for a code book whose values changed
        (`quant.codes.CODE_REVISION`: "nf3:64:1:2"); NF4/FP4/INT4 tags are as they always were."""
        revision = code_revision(self.quant_type)
        return f"{self.quant_type}:{self.blocksize}:{int(self.double_quant)}" + (f":{revision}" if revision > 1 else "")

    def get_extra_state(self) -> torch.Tensor:
        """The format the buffers are in ("nf3:64:1", as uint8 bytes, so safetensors can store
        it): NF3 codes loaded into an NF4 layer would be valid codes with other values."""
        return torch.tensor(list(self.format_tag().encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        pass  # checked in _load_from_state_dict, before any buffer changes

    def _check_format_tag(self, state_dict, prefix: str) -> None:
        key = prefix + "_extra_state"
        revision = code_revision(self.quant_type)
        if key not in state_dict:  # saved before the tag existed: the buffers' checks still run
            if revision > 1 and any(prefix + name in state_dict for name in self._expected_buffers()):
                raise ValueError(f"{prefix or 'state_dict'}: the saved {self.quant_type} weight has no format tag, so "
                                 f"it may hold codes of {self.quant_type}'s revision-1 code book, whose values "
                                 f"differ from this one's (revision {revision}, quant.codes.CODE_REVISION); "
                                 "quantize the float weight again")
            return
        tag = state_dict[key]
        ok = isinstance(tag, torch.Tensor) and tag.dtype == torch.uint8 and tag.dim() == 1
        found = bytes(tag.tolist()).decode(errors="replace") if ok else repr(tag)
        if found != self.format_tag():
            q, b, d = (found.split(":") + ["?", "?"])[:3]
            saved_revision = (found.split(":") + ["1"] * 3)[3]
            if (q, b, d) == (self.quant_type, str(self.blocksize), str(int(self.double_quant))):
                raise ValueError(f"{prefix or 'state_dict'}: the saved {q} weight uses revision {saved_revision} of "
                                 f"the {q} code book, this layer revision {revision} (quant.codes.CODE_REVISION): "
                                 "the same codes stand for other values. Quantize the float weight again")
            raise ValueError(f"{prefix or 'state_dict'}: the saved 4-bit weight has quant_type={q}, blocksize={b}, "
                             f"double_quant={d == '1'}, but this layer has quant_type={self.quant_type}, "
                             f"blocksize={self.blocksize}, double_quant={self.double_quant}; its codes would "
                             "decode to other values. Build the layer with the saved format")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """nn.Module's loader would cast a float absmax into the uint8 codes without a word:
        refuse a state saved in another format (quant type, blocksize, double quant), any
        buffer of another dtype or shape, and validate the state the loaded buffers make,
        all before one buffer changes."""
        self._check_format_tag(state_dict, prefix)
        incoming = {}
        for name, (dtype, shape) in self._expected_buffers().items():
            key = prefix + name
            if key not in state_dict:
                continue  # reported as missing by nn.Module (strict) or kept as it is
            t = state_dict[key]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{key} must be a {dtype} tensor of shape {shape} for this layer "
                                 f"(quant_type={self.quant_type}, blocksize={self.blocksize}, "
                                 f"double_quant={self.double_quant}), got {got}")
            incoming[name] = t.to(self.weight_packed.device)
        if incoming:
            state = self.quant_state
            for name in ("absmax", "offset", "nested_absmax"):
                if name in incoming:
                    setattr(state, name, incoming[name])
            try:
                state.validate(incoming.get("weight_packed", self.weight_packed))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{prefix or 'state_dict'}: the loaded buffers do not make a valid "
                                 f"4-bit weight: {e}") from None
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k != prefix + "_extra_state"]

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(dtype)` must move, never cast, the float32 absmax and code books:
        # a float16 absmax would change every dequantized value.
        # The code books stay the one shared tensor of their device (a per-layer copy each).
        keep = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = new = old.to(new.device)
            if name == "code_book":
                self._buffers[name] = shared_code(self.quant_type, new.device)
            elif name == "nested_code_book":
                self._buffers[name] = shared_code("dynamic8", new.device)
        return self

    def storage_bytes(self) -> int:
        """Bytes of the 4-bit weight: packed codes + absmax (+ nested absmax and offset); no bias."""
        tensors = [self.weight_packed, self.absmax]
        if self.double_quant:
            tensors += [self.offset, self.nested_absmax]
        return sum(t.numel() * t.element_size() for t in tensors)

    def bits_per_parameter(self) -> float:
        """Storage bits per weight: 4.5 at blocksize 64 without double quantization, ~4.127 with
        it (QLoRA sec. 3: 32/64 bits of absmax become 8/64 + 32/(64 * 256))."""
        return 8 * self.storage_bytes() / (self.in_features * self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}")


def tied_linears(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """{linear name: another module holding the same weight Parameter} for `names`."""
    holders: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    out = {}
    for n in names:
        others = [h for h in holders.get(id(model.get_submodule(n).weight), []) if h != f"{n}.weight"]
        if others:
            out[n] = others[0].rsplit(".", 1)[0]
    return out


LinearNF4 = Linear4bit  # the first name (it serves FP4 and INT4 too); kept for existing code


def quantize_model(model: nn.Module, target_modules: str | Iterable[str] | None = None, *,
                   exclude_modules: str | Iterable[str] | None = None, quant_type: str = "nf4",
                   blocksize: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype = torch.bfloat16, progress: bool = False,
                   quantize_tied: bool = False) -> nn.Module:
    """Replace `nn.Linear` modules of `model` by `Linear4bit`, in place.

    Args:
        model: any module.
        target_modules: None for every `nn.Linear`; a list of names (a name matches itself
            or any name ending in "." + it, as PEFT); or a regex string for the full name.
        exclude_modules: names or regex to leave in full precision (e.g. ["lm_head"]).
        quant_type, blocksize, double_quant, compute_dtype: as `Linear4bit`.
        progress: show a tqdm bar.
        quantize_tied: a linear whose weight is shared with another module (an output head
            tied to the input embedding) is left in full precision, as transformers +
            bitsandbytes leave it: quantizing it would untie the two, and the embedding
            would keep the full-precision copy anyway. True quantizes it (and unties it).

    Returns:
        `model` itself. Raises ValueError if the targets match no `nn.Linear`, if a target
        named explicitly is tied (without `quantize_tied`), or if a target's weight is on the
        `meta` device (quantizing needs the real values: load them first). Nothing is
        changed when it raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(quantize_tied, bool):
        raise TypeError(f"quantize_tied must be a bool, got {quantize_tied!r}")
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and n and (target_modules is None or name_matches(target_modules, n))
             and not name_matches(exclude_modules, n)]
    if not names:
        linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear of {type(model).__name__}; "
                         f"nn.Linear modules: {linears[:40]}")
    tied = tied_linears(model, names)
    if tied and not quantize_tied:
        if target_modules is not None:  # asked for by name: say why it cannot be done as asked
            raise ValueError(f"target_modules={target_modules!r} names {sorted(tied)}, whose weight is tied to "
                             f"{[tied[n] for n in tied]}: quantizing would untie them. Leave them out "
                             f"(exclude_modules), or pass quantize_tied=True to quantize and untie")
        warnings.warn(f"quantize_model leaves {sorted(tied)} in full precision: their weight is tied to "
                      f"{sorted(set(tied.values()))} (quantize_tied=True quantizes and unties them)", stacklevel=2)
        names = [n for n in names if n not in tied]
    meta = [n for n in names if model.get_submodule(n).weight.device.type == "meta"]
    if meta:
        raise ValueError(f"quantize_model needs real weights, but {meta[:8]}{' ...' if len(meta) > 8 else ''} "
                         f"are on the meta device: load the weights first (model.to_empty(device=...) and "
                         f"load_state_dict), or quantize each layer while loading")
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched only tied linears {sorted(tied)}")
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="quantize", disable=not progress):
        set_submodule(model, name, Linear4bit.from_linear(model.get_submodule(name), quant_type=quant_type,
                                                          blocksize=blocksize, double_quant=double_quant,
                                                          compute_dtype=compute_dtype))
    return model
