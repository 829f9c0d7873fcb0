"""PEFT's custom-model matrix (huggingface/peft tests/test_custom_models.py), on this library's API.

Models: MLP, Embedding + GPT-2 Conv1D, Conv1d, Conv2d, Conv2d with groups, Conv3d,
MultiheadAttention, and a ViT-like model (Conv2d patches + MultiheadAttention +
TransformerEncoderLayer) under "all-linear". Configs: plain, dropout, rsLoRA, DoRA, two
adapters. Each row checks: finite forward; a fresh adapter changes nothing; with random
factors the output moves and equals a dense float64 reference written the obvious way
(gradients too); merged == unmerged and unmerge restores; disabled == base; save/load
round trip; one training step changes only adapter parameters; bfloat16 and float16
forwards; and where PEFT supports the row, the same file gives the same outputs in PEFT,
both directions.

Tolerances (relative to max(1, max |reference|), as `lora.reference.assert_close`):
float32 1e-5 and bfloat16 3e-2 from `lora.reference.TOL`; float16: unit roundoff
u = 2^-11, a dot product of K <= 64 terms errs by at most ~K u / 4 in practice (random
signs) and the two-layer models add a second such error, so 8 u = 3.9e-3.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lora import (
    LoRAConfig,
    LoRAConv,
    LoRAEmbedding,
    LoRAMultiheadAttention,
    apply_lora,
    disable_adapters,
    load_adapter,
    merge_and_unload,
    save_adapter,
    trainable_parameters,
)
from lora.inject import lora_layers
from lora.reference import TOL

F16_TOL = 8 * 2.0 ** -11  # see the module docstring


# ----- models (inputs are fixed per model) -----
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class EmbConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(7, 5)  # GPT-2's layer: weight (in=5, out=7)

    def forward(self, ids):
        return self.conv1d(self.emb(ids))


class Conv(nn.Module):
    def __init__(self, dims: int, groups: int = 1, dilation: int = 1):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        kernel = {1: 3, 2: (3, 2), 3: (2, 3, 3)}[dims]
        self.conv = conv(4, 6, kernel, stride=2 if dims < 3 else 1, padding=1, dilation=dilation, groups=groups)
        self.lin = nn.LazyLinear(3)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).flatten(1))


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(12, 3, batch_first=True)
        self.lin = nn.Linear(12, 2)

    def forward(self, x):
        return self.lin(self.mha(x, x, x, need_weights=False)[0])


def _input(model_id: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if model_id == "emb_conv1d":
        return torch.randint(0, 100, (3, 9), generator=g)
    shape = {"mlp": (5, 10), "conv1d": (2, 4, 11), "conv2d": (2, 4, 9, 7), "conv2d_groups": (2, 4, 9, 7),
             "conv2d_dilated": (2, 4, 9, 7), "conv3d": (2, 4, 3, 5, 6), "mha": (2, 5, 12)}[model_id]
    return torch.randn(shape, generator=g)


MODELS = {"mlp": MLP, "emb_conv1d": EmbConv1D, "conv1d": lambda: Conv(1), "conv2d": lambda: Conv(2),
          "conv2d_groups": lambda: Conv(2, groups=2), "conv2d_dilated": lambda: Conv(2, dilation=2),
          "conv3d": lambda: Conv(3), "mha": MHA}
TARGETS = {"mlp": ["lin0", "lin1"], "emb_conv1d": ["emb", "conv1d"], "mha": ["mha"]}


def _base(model_id: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[model_id]()
    with torch.no_grad():
        model(_input(model_id))  # materialise lazy layers
    return model.eval()


# (model, config) rows; DoRA only where a variant exists (dense linear, conv with groups = 1)
ROWS = [(m, "plain") for m in MODELS] + [(m, "dropout") for m in ("mlp", "conv2d", "conv2d_groups")] \
    + [(m, "rslora") for m in ("conv1d", "mha")] \
    + [(m, "dora") for m in ("mlp", "conv1d", "conv2d", "conv2d_dilated", "conv3d")] \
    + [(m, "two") for m in ("mlp", "conv2d")]
CONFIGS = {"plain": {}, "dropout": {"dropout": 0.1}, "rslora": {"rslora": True}, "dora": {"dora": True},
           "two": {}}


def _config(model_id: str, kind: str) -> LoRAConfig:
    r = 4  # a multiple of the grouped conv's groups (PEFT's rule for a grouped lora_B)
    return LoRAConfig(r=r, alpha=8, target_modules=TARGETS.get(model_id, ["conv", "lin"]), **CONFIGS[kind])


def _lora_model(model_id: str, kind: str):
    base = _base(model_id)
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Conv1D's fan_in_fan_out, the embedding's dropout
        apply_lora(model, _config(model_id, kind))
        if kind == "two":
            apply_lora(model, _config(model_id, "plain"), adapter_name="other")
            from lora import set_adapter
            set_adapter(model, ["default", "other"])
    return base, model


def _randomize(model: nn.Module, seed: int = 1) -> None:
    """Random B (and A, m) so the adapters change the output; scaled to keep values O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for dict_name in layer.adapter_dict_names:
                for p in getattr(layer, dict_name).parameters():
                    noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                    if dict_name == "lora_magnitude_vector":
                        p.mul_(1 + 0.2 * noise.abs())
                    else:
                        p.copy_(noise * 0.3)


# ----- the dense float64 reference, written the obvious way -----
class _Ref(nn.Module):
    """One adapted layer in float64: the base layer's math with the adapted weight, or (a
    grouped conv, whose update no grouped kernel holds) base + scaling * B(A(x)) functionally."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.base = copy.deepcopy(layer.base_layer).double()
        names = [n for n in layer.active_adapters]
        a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if isinstance(layer, LoRAEmbedding) \
            else ("lora_A", "lora_B")

        def leaf(t):
            return nn.Parameter(t.detach().double().clone())

        def get(container, n):
            obj = getattr(layer, container)[n]
            return obj if isinstance(obj, torch.Tensor) else obj.weight
        self.A = nn.ParameterList([leaf(get(a_name, n)) for n in names])
        self.B = nn.ParameterList([leaf(get(b_name, n)) for n in names])
        self.s = [layer.scaling[n] for n in names]
        self.m = nn.ParameterList([leaf(layer.lora_magnitude_vector[n].weight) for n in names
                                   if n in getattr(layer, "lora_magnitude_vector", {})])
        if isinstance(layer, LoRAMultiheadAttention):
            out = layer.out_proj_lora
            self.Ao = nn.ParameterList([leaf(out.lora_A[n].weight) for n in names])
            self.Bo = nn.ParameterList([leaf(out.lora_B[n].weight) for n in names])
            self.so = [out.scaling[n] for n in names]
            self.base.out_proj = self.base.out_proj.base_layer  # the plain nn.Linear

    def _dora(self, V):
        """DoRA eq. 5: (m / ||V||) V, the norm over everything but the output dim, detached (sec. 4.3)."""
        norm = torch.linalg.vector_norm(V.reshape(V.shape[0], -1), dim=1).detach()
        return (self.m[0].reshape(-1) / norm).reshape((-1,) + (1,) * (V.dim() - 1)) * V

    def forward(self, x, *args, **kwargs):
        layer, base = self.layer, self.base
        if isinstance(layer, LoRAMultiheadAttention):
            w_in = base.in_proj_weight + sum(s * B @ A for A, B, s in zip(self.A, self.B, self.s, strict=True))
            w_out = base.out_proj.weight + sum(s * B @ A for A, B, s in zip(self.Ao, self.Bo, self.so, strict=True))
            x, *args = [t.double() for t in (x, *args)]
            return functional_call(base, {"in_proj_weight": w_in, "out_proj.weight": w_out}, (x, *args), kwargs)
        if isinstance(layer, LoRAEmbedding):
            E = base.weight + sum(s * (B @ A).T for A, B, s in zip(self.A, self.B, self.s, strict=True))  # (num, dim)
            return F.embedding(x, E)
        x = x.double()
        if isinstance(layer, LoRAConv):
            conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[base.weight.dim()]
            geo = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
            if self.m:
                r = self.A[0].shape[0]
                V = base.weight + self.s[0] * (self.B[0].reshape(-1, r) @ self.A[0].reshape(r, -1)).reshape(
                    base.weight.shape)  # (out, in, *k)
                return conv(x, self._dora(V), base.bias, **geo)
            out = conv(x, base.weight, base.bias, groups=base.groups, **geo)
            for A, B, s in zip(self.A, self.B, self.s, strict=True):
                out = out + s * conv(conv(x, A, **geo), B, groups=base.groups)
            return out
        W = base.weight.T if layer.fan_in_fan_out else base.weight  # (out, in)
        V = W + sum(s * B @ A for A, B, s in zip(self.A, self.B, self.s, strict=True))
        return F.linear(x, self._dora(V) if self.m else V, base.bias)

    def factor_grads(self):
        return [p.grad for p in (*self.A, *self.B, *self.m)]


def _reference(model: nn.Module):
    """(float64 copy of `model` with every LoRA layer replaced by `_Ref`, {path: _Ref})."""
    ref = copy.deepcopy(model)
    refs = {}
    for path, layer in list(lora_layers(model)):
        if "." in path and any(path.startswith(p + ".") for p in refs):
            continue  # the out_proj inside a LoRAMultiheadAttention: part of its _Ref
        refs[path] = _Ref(layer)
        parent, _, child = path.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, child, refs[path])
    for name, p in ref.named_parameters():
        if not any(name.startswith(path + ".") for path in refs):
            p.data = p.data.double()
    return ref.eval(), refs


def _close(actual, expected, dtype, scale_from=None):
    atol, rtol = TOL[dtype] if dtype in TOL else (F16_TOL, F16_TOL)
    scale = max(1.0, float((scale_from if scale_from is not None else expected).detach().abs().max()))
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), atol=atol * scale, rtol=rtol)


def _factor_params(layer):
    """Active adapters' A, B (and m), in `_Ref.factor_grads` order."""
    names = layer.active_adapters
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if isinstance(layer, LoRAEmbedding) \
        else ("lora_A", "lora_B")

    def get(container, n):
        obj = getattr(layer, container)[n]
        return obj if isinstance(obj, torch.Tensor) else obj.weight
    ms = [layer.lora_magnitude_vector[n].weight for n in names if n in getattr(layer, "lora_magnitude_vector", {})]
    return [get(a_name, n) for n in names] + [get(b_name, n) for n in names] + ms


ROW_IDS = [f"{m}-{k}" for m, k in ROWS]


@pytest.mark.parametrize("model_id, kind", ROWS, ids=ROW_IDS)
def test_row_against_dense_reference(model_id, kind):
    base, model = _lora_model(model_id, kind)
    x = _input(model_id)
    with torch.no_grad():
        expected = base(x)
        fresh = model(x)
    assert torch.isfinite(fresh).all()
    # equal up to float32 rounding: BLAS may round a small GEMM differently for another allocation
    _close(fresh, expected, torch.float32)
    _randomize(model)
    ref, refs = _reference(model)
    out = model(x)
    assert (out - expected).abs().max() > 1e-3  # the adapters act
    ref_out = ref(x)
    _close(out, ref_out, torch.float32)
    # gradients of every factor against the reference's (same loss)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (out.double() * g).sum().backward()
    (ref_out * g).sum().backward()
    for path, r in refs.items():
        layer = model.get_submodule(path)
        for got, want in zip(_factor_params(layer), r.factor_grads(), strict=True):
            _close(got.grad, want, torch.float32, scale_from=want)
    with torch.no_grad(), disable_adapters(model):
        _close(model(x), expected, torch.float32)


@pytest.mark.parametrize("model_id, kind", ROWS, ids=ROW_IDS)
def test_row_merge_save_train(model_id, kind, tmp_path):
    base, model = _lora_model(model_id, kind)
    x = _input(model_id)
    _randomize(model)
    with torch.no_grad():
        unmerged = model(x)
    layers = [layer for _, layer in lora_layers(model)]
    before = {id(layer): layer.base_weight().detach().clone() for layer in layers}
    if model_id == "conv2d_groups":
        with pytest.raises(ValueError, match="groups=2"):
            model.conv.merge()
    else:
        for layer in layers:
            layer.merge()
        with torch.no_grad():
            _close(model(x), unmerged, torch.float32)
        for layer in layers:
            if layer.merged:
                layer.unmerge()
            # unmerge subtracts what merge added: float32 rounding of W + delta - delta
            _close(layer.base_weight(), before[id(layer)], torch.float32)
    # save / load round trip into a fresh copy of the base
    save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path)
    if kind == "two":
        load_adapter(fresh, tmp_path / "other", adapter_name="other")
        from lora import set_adapter
        set_adapter(fresh, ["default", "other"])
    with torch.no_grad():
        _close(fresh(x), unmerged, torch.float32)
    # one training step changes the adapters and nothing else
    model.train()
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).float().pow(2).mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
    assert changed and all("lora_" in n for n in changed), sorted(changed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_id", list(MODELS))
def test_half_precision_forward(model_id, dtype):
    _, model = _lora_model(model_id, "plain")
    _randomize(model)
    x = _input(model_id)
    ref, _ = _reference(model)
    with torch.no_grad():
        expected = ref(x)
        model = model.to(dtype)  # base and adapters in half precision
        out = model(x if not x.is_floating_point() else x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    _close(out, expected, dtype)


def test_merge_and_unload_gives_plain_layers():
    for model_id in ("conv2d", "mha", "conv3d"):
        _, model = _lora_model(model_id, "plain")
        _randomize(model)
        x = _input(model_id)
        with torch.no_grad():
            expected = model(x)
            merge_and_unload(model)
            assert not list(lora_layers(model))
            assert type(model.get_submodule(TARGETS.get(model_id, ["conv"])[0])).__module__.startswith("torch.nn")
            _close(model(x), expected, torch.float32)


# ----- PEFT: same files, same outputs, both directions -----
peft = pytest.importorskip("peft")

# PEFT 0.21 builds a conv's lora_A without the base's dilation (its output then has the wrong
# size), so dilated convs are compared with the dense reference only.
PEFT_ROWS = [(m, k) for m, k in ROWS if k != "two" and m != "conv2d_dilated"]


def _peft_config(model_id, kind):
    cfg = _config(model_id, kind)
    return peft.LoraConfig(**cfg.to_peft_dict() | {"init_lora_weights": False, "inference_mode": False})


def _zero_mha_out_proj_b(model):
    """PEFT 0.21's MultiheadAttention adds the out_proj update twice in forward (it merges it
    by hand, then calls out_proj.merge(), which adds it again; see the README's PEFT notes),
    so the comparison runs with out_proj's B at zero; in_proj and the file layout still count."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "out_proj.lora_B" in name:
                p.zero_()


@pytest.mark.parametrize("model_id, kind", PEFT_ROWS, ids=[f"{m}-{k}" for m, k in PEFT_ROWS])
def test_row_same_file_same_outputs_as_peft(model_id, kind, tmp_path):
    base, model = _lora_model(model_id, kind)
    x = _input(model_id)
    _randomize(model)
    if model_id == "mha":
        _zero_mha_out_proj_b(model)
    model.eval()
    with torch.no_grad():
        ours = model(x)
    save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        _close(theirs(x), ours, torch.float32)
    # and back: a file PEFT wrote (other random factors) loads here with PEFT's outputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), _peft_config(model_id, kind))
    _randomize(pm, seed=2)
    if model_id == "mha":
        _zero_mha_out_proj_b(pm)
    pm.eval()
    with torch.no_grad():
        peft_out = pm(x)
    pm.save_pretrained(str(tmp_path / "peft"))
    mine = copy.deepcopy(base)
    load_adapter(mine, tmp_path / "peft", is_trainable=True)
    with torch.no_grad():
        _close(mine(x), peft_out, torch.float32)
    assert trainable_parameters(mine) == tuple(pm.get_nb_trainable_parameters())


def test_all_linear_on_a_model_with_multihead_attention_trains_and_matches_peft(tmp_path):
    """A ViT-like model: "all-linear" wraps the attention modules (not their out_proj, which
    nn.MultiheadAttention reads without calling) plus the patch conv; a few steps lower the
    loss, eval (PyTorch's fused encoder path) equals train mode, and PEFT reads the file."""
    torch.manual_seed(0)

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 16, 4, stride=4)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            h = self.patch(x).flatten(2).transpose(1, 2)  # (B, patches, 16)
            h = h + self.attn(h, h, h, need_weights=False)[0]
            return self.head(self.enc(h).mean(1))

    base = ViT().eval()
    model = copy.deepcopy(base)
    names = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    assert names == ["attn", "enc.self_attn", "enc.linear1", "enc.linear2", "head"]
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["patch"]), adapter_name="conv")
    from lora import set_adapter
    set_adapter(model, ["default", "conv"])
    with pytest.raises(ValueError, match="out_proj of an nn.MultiheadAttention"):
        apply_lora(copy.deepcopy(base), LoRAConfig(target_modules=["out_proj"]))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        train_mode = model(x)
        model.eval()
        eval_mode = model(x)  # the fused TransformerEncoderLayer path would skip the adapters
    _close(eval_mode, train_mode, torch.float32)
    _zero_mha_out_proj_b(model)
    with torch.no_grad():
        ours = model(x)  # both adapters: all-linear and the patch conv
    save_adapter(model, tmp_path, adapter_names=["default", "conv"])
    torch.backends.mha.set_fastpath_enabled(False)  # PEFT's layers inside the encoder need the slow path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
            theirs.load_adapter(str(tmp_path / "conv"), adapter_name="conv")
        theirs.base_model.set_adapter(["default", "conv"])
        with torch.no_grad():
            _close(theirs(x), ours, torch.float32)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_refusals_name_the_argument():
    """Rows PEFT refuses are refused here too, with a message naming what to change."""
    with pytest.raises(ValueError, match="r=3 must be a multiple of groups=2"):
        apply_lora(_base("conv2d_groups"), LoRAConfig(r=3, target_modules=["conv"]))
    with pytest.raises(ValueError, match="dora=True needs"):
        apply_lora(_base("conv2d_groups"), LoRAConfig(r=4, target_modules=["conv"], dora=True))
    with pytest.raises(ValueError, match="dora=True needs"):
        apply_lora(_base("mha"), LoRAConfig(r=4, target_modules=["mha"], dora=True))
    with pytest.raises(ValueError, match="kdim = vdim = embed_dim"):
        LoRAMultiheadAttention.from_layer(nn.MultiheadAttention(12, 3, kdim=5, vdim=5))
    layer = LoRAMultiheadAttention.from_layer(nn.MultiheadAttention(12, 3))
    with pytest.raises(ValueError, match="dropout=0.1"):
        layer.add_adapter("other", dropout=0.1)
    model = _base("conv2d")
    apply_lora(model, LoRAConfig(r=2, target_modules=["conv"]))
    apply_lora(model, LoRAConfig(r=2, target_modules=["conv"], dropout=0.2), adapter_name="other")
    assert isinstance(model.conv.lora_dropout["other"], nn.Dropout)  # a second adapter keeps its dropout
    assert model.conv.lora_dropout["other"].p == 0.2


def test_a_users_own_layer_type_through_the_registry(tmp_path):
    """The one extension point (`register_lora_layer`, which the built-in types use too): a
    user's layer with a kernel stored (in, out), its LoRA layer in ~20 lines, then the
    library's injection, merge, disable and files work unchanged."""
    from lora import LoRALayer, register_lora_layer
    from lora.registry import LINEAR_LIKE_TYPES, LORA_LAYER_TYPES

    class Dense(nn.Module):  # the user's layer: x @ kernel + bias
        def __init__(self, d_in, d_out):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(d_in, d_out) / d_in ** 0.5)
            self.bias = nn.Parameter(torch.zeros(d_out))

        def forward(self, x):
            return x @ self.kernel + self.bias

    class LoRADense(LoRALayer):  # its LoRA layer
        adapter_dict_names = ("lora_A", "lora_B")

        def __init__(self, base, r=8, alpha=16, dropout=0.0, *, adapter_name="default", **kwargs):
            super().__init__(base)
            self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
            self.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, **kwargs)

        @classmethod
        def from_layer(cls, base, fan_in_fan_out=None, **kwargs):
            return cls(base, **kwargs)

        def _create_adapter(self, name, r, dropout, device, dtype):
            d_in, d_out = self.base_layer.kernel.shape
            self.lora_A[name] = nn.Linear(d_in, r, bias=False, device=device, dtype=dtype)
            self.lora_B[name] = nn.Linear(r, d_out, bias=False, device=device, dtype=dtype)
            self.lora_dropout[name] = nn.Dropout(dropout) if dropout else nn.Identity()

        def reset_adapter(self, name, init="kaiming"):
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=5 ** 0.5)
            nn.init.zeros_(self.lora_B[name].weight)

        def base_weight(self):  # what merge writes into
            return self.base_layer.kernel

        def get_delta_weight(self, name):  # shaped like the kernel: (in, out)
            return (self.lora_B[name].weight @ self.lora_A[name].weight).T * self.scaling[name]

        def forward(self, x):
            out = self.base_layer(x)
            if self.disabled or self.merged:
                return out
            for n in self.active_adapters:
                out = out + self.lora_B[n](self.lora_A[n](self.lora_dropout[n](x))) * self.scaling[n]
            return out

    register_lora_layer(Dense, LoRADense)
    try:
        torch.manual_seed(0)
        base = nn.Sequential(Dense(6, 9), nn.ReLU(), Dense(9, 2)).eval()
        model = copy.deepcopy(base)
        assert apply_lora(model, LoRAConfig(r=3, alpha=6, target_modules="all-linear")) == ["0", "2"]
        _randomize(model)
        x = torch.randn(4, 6)
        # dense float64 reference: kernel + scaling * (B A)^T
        h = x.double()
        for i in (0, 2):
            layer = model[i]
            kernel = layer.base_layer.kernel.double() + 2.0 * (layer.lora_B["default"].weight.double()
                                                                 @ layer.lora_A["default"].weight.double()).T
            h = h @ kernel + layer.base_layer.bias.double()
            h = torch.relu(h) if i == 0 else h
        with torch.no_grad():
            out = model(x)
            _close(out, h, torch.float32)
            with disable_adapters(model):
                _close(model(x), base(x), torch.float32)
            save_adapter(model, tmp_path)
            fresh = copy.deepcopy(base)
            load_adapter(fresh, tmp_path)
            _close(fresh(x), out, torch.float32)
            merge_and_unload(model)
            assert type(model[0]) is Dense
            _close(model(x), out, torch.float32)
    finally:
        LORA_LAYER_TYPES.pop(Dense, None)
        LINEAR_LIKE_TYPES.discard(Dense)


def test_dora_embedding_layer_against_reference_and_peft():
    """DoRA on nn.Embedding (PEFT's: one magnitude per embedding dimension, the norm over all
    tokens of E + s (B A)^T), at the layer level; through `apply_lora` and PEFT's files in
    tests/test_lora_bias_layers.py."""
    torch.manual_seed(0)
    base = nn.Embedding(30, 6)
    layer = LoRAEmbedding.from_layer(copy.deepcopy(base), r=3, alpha=6, dora=True)
    ids = torch.randint(0, 30, (4, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(layer(ids), base(ids), torch.float32)  # fresh: m = ||E||_column
        layer.lora_embedding_A["default"].normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.3)
    A, B, m = (t.detach().double().requires_grad_(True) for t in
               (layer.lora_embedding_A["default"], layer.lora_embedding_B["default"],
                layer.lora_magnitude_vector["default"].weight))
    V = base.weight.double() + 2.0 * (B @ A).T  # (num, dim)
    ref = F.embedding(ids, V * (m / torch.linalg.vector_norm(V, dim=0).detach()))  # DoRA eq. 5, per column
    out = layer(ids)
    _close(out, ref, torch.float32)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out.double() * g).sum().backward()
    (ref * g).sum().backward()
    for got, want in ((layer.lora_embedding_A["default"], A), (layer.lora_embedding_B["default"], B),
                      (layer.lora_magnitude_vector["default"].weight, m)):
        _close(got.grad, want.grad, torch.float32, scale_from=want.grad)
    with torch.no_grad():
        y = layer(ids)
        layer.merge()
        _close(layer(ids), y, torch.float32)
        layer.unmerge()
        _close(layer.base_layer.weight, base.weight, torch.float32)
    from peft.tuners.lora.layer import Embedding as PeftEmbedding
    theirs = PeftEmbedding(copy.deepcopy(base), "default", config=peft.LoraConfig(r=3, lora_alpha=6, use_dora=True),
                           r=3, lora_alpha=6, use_dora=True)
    with torch.no_grad():
        theirs.lora_embedding_A["default"].copy_(layer.lora_embedding_A["default"])
        theirs.lora_embedding_B["default"].copy_(layer.lora_embedding_B["default"])
        theirs.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector["default"].weight)
        _close(theirs(ids), y, torch.float32)
