"""PiSSA, OLoRA and LoftQ inits (lora/init.py) and their use in layers, apply_lora and files.

References are written the obvious way in float64 (`torch.linalg.svd`, `torch.linalg.qr`).
Tolerances, with u = 2**-24 (float32 unit roundoff):
- a float32 sum or dot product of K terms errs by at most K * u * (sum of |terms|)
  (Higham, "Accuracy and Stability", eq. 3.5); `base = W - s * B @ A` has K = r + 1.
- a float32 SVD/QR is backward stable: it is exact for W + E with ||E|| <= n * u * ||W||
  (n = max dimension, Golub & Van Loan 5.2 / 8.6); a rank-r part then moves by at most
  ||E|| * (1 + 2 ||W|| / gap) (Wedin), gap = s_r - s_{r+1}; our test matrices have gap >= ||W|| / 4.
"""
import copy
import json
import warnings

import pytest
import torch
from torch import nn

from lora import (
    LoRAConfig,
    LoRAEmbedding,
    LoRALinear,
    QLoRALinear,
    apply_lora,
    load_adapter,
    save_adapter,
)
from lora.init import loftq, loftq_error, loftq_iterates, olora, pissa, randomized_svd
from lora.inject import lora_layers
from lora.reference import assert_close
from quant import dequantize_4bit, quantize_4bit, quantize_model

U32 = 2.0 ** -24


def spectrum_matrix(m, n, r, seed=0):
    """(m, n) float32 with singular values 4, 3.9, ... (r of them), then <= 0.5: gap >= ||W|| / 8."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    k = min(m, n)
    S = torch.cat([torch.linspace(4.0, 3.0, r), torch.linspace(0.5, 0.01, k - r)]).double()
    return ((U * S) @ V.T).float()


def svd_tol(W, gap):
    n = max(W.shape)
    norm = float(torch.linalg.matrix_norm(W.double(), 2))
    return n * U32 * norm * (1 + 2 * norm / gap)


# ----- the plain functions -----

@pytest.mark.parametrize("scaling", [1.0, 2.5])
def test_pissa_matches_float64_svd_and_rebuilds_w(scaling):
    W, r = spectrum_matrix(40, 56, 6), 6
    base, A, B = pissa(W, r, scaling=scaling)
    assert (base.shape, A.shape, B.shape) == ((40, 56), (6, 56), (40, 6))
    assert base.dtype == A.dtype == B.dtype == torch.float32
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    top = (U[:, :r] * S[:r]) @ Vh[:r]  # reference: the principal part, sign-free
    gap = float(S[r - 1] - S[r])
    torch.testing.assert_close(scaling * B.double() @ A.double(), top, atol=svd_tol(W, gap), rtol=0)
    # PiSSA sec. 3: A = sqrt(S_r / s) V_r^T, so A A^T = diag(S_r) / s exactly in exact arithmetic
    torch.testing.assert_close(A.double() @ A.double().T, torch.diag(S[:r]) / scaling, atol=svd_tol(W, gap), rtol=0)
    # identity: base + s B A = W up to the rounding of base = W - s B A (K = r + 1 terms)
    bound = (r + 2) * U32 * (W.double().abs() + scaling * B.double().abs() @ A.double().abs())
    assert ((base.double() + scaling * B.double() @ A.double() - W.double()).abs() <= bound).all()


def test_olora_orthonormal_factor_and_float64_qr():
    W, r = spectrum_matrix(48, 32, 5, seed=1), 5
    base, A, B = olora(W, r, scaling=2.0)
    assert (A.shape, B.shape) == ((5, 32), (48, 5))
    eye = torch.eye(r, dtype=torch.float64)
    assert (B.double().T @ B.double() - eye).abs().max() <= 48 * U32 * 10  # orthonormal columns (Q of a QR)
    Q, R = torch.linalg.qr(W.double())
    ref = Q[:, :r] @ R[:r]  # sign-free product: projection of W on its first r columns' span
    torch.testing.assert_close(B.double() @ A.double(), ref, atol=48 * U32 * 50 * float(W.abs().max()), rtol=0)
    assert torch.allclose(A.double(), torch.triu(A.double()), atol=0)  # R_r is upper triangular
    # PEFT's convention: the base loses scaling * Q_r R_r
    bound = (r + 2) * U32 * (W.double().abs() + 2.0 * B.double().abs() @ A.double().abs())
    assert ((base.double() + 2.0 * B.double() @ A.double() - W.double()).abs() <= bound).all()


def test_randomized_svd_is_seeded_and_close_to_exact():
    W, r = spectrum_matrix(64, 80, 4, seed=2), 4
    a = pissa(W, r, niter=4, generator=torch.Generator().manual_seed(0))
    b = pissa(W, r, niter=4, generator=torch.Generator().manual_seed(0))
    c = pissa(W, r, niter=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.base, b.base)
    assert not torch.equal(a.A, c.A)
    exact = pissa(W, r)
    # with s_{q+1} / s_r <= 0.5 / 3 and 4 power iterations the sketch error ((1/6)^9) is below rounding
    torch.testing.assert_close(a.B.double() @ a.A.double(), exact.B.double() @ exact.A.double(),
                               atol=2 * svd_tol(W, 2.5), rtol=0)
    # float64, 6 power iterations: error factor (0.5 / 3)^(4 * 6 + 2) ~ 1e-20, below float64 rounding
    U, S, Vh = randomized_svd(W.double(), r, 6, torch.Generator().manual_seed(3))
    torch.testing.assert_close(S, torch.linalg.svdvals(W.double())[:r], atol=1e-12, rtol=0)


def test_loftq_shapes_and_first_step_is_eckart_young():
    torch.manual_seed(0)
    W, r = torch.randn(48, 80) * 0.05, 8
    (packed, state), A, B = loftq(W, 4, r, 1)
    assert packed.dtype == torch.uint8 and packed.shape == (48 * 80 // 2,) and tuple(state.shape) == (48, 80)
    assert A.shape == (r, 80) and B.shape == (48, r) and A.dtype == torch.float32
    # reference: step 1 quantizes W itself; the best rank-r fit of W - Q leaves sqrt(sum_{i>r} s_i^2)
    p0, s0 = quantize_4bit(W)
    assert torch.equal(p0, packed)
    S = torch.linalg.svdvals(W.double() - dequantize_4bit(p0, s0, dtype=torch.float32).double())
    expected = float(S[r:].square().sum().sqrt())
    err = loftq_error(W, loftq(W, 4, r, 1))
    assert abs(err - expected) <= 80 * U32 * float(torch.linalg.matrix_norm(W.double())) * 10
    assert err < float(S.square().sum().sqrt())  # better than B = 0 QLoRA


def test_loftq_error_never_grows_over_iterations():
    torch.manual_seed(1)
    W = torch.randn(64, 96) * 0.02 + (torch.randn(64, 6) @ torch.randn(6, 96)) * 0.01
    errors = [loftq_error(W, step) for step in loftq_iterates(W, 4, 8, 5)]
    p, s = quantize_4bit(W)
    qlora = float((W.double() - dequantize_4bit(p, s, dtype=torch.float32).double()).norm())
    rounding = 96 * U32 * float(W.double().norm())
    assert errors[0] < qlora
    for before, after in zip(errors, errors[1:], strict=False):
        assert after <= before + rounding, errors
    assert errors[-1] < errors[0]


def test_loftq_matches_peft_algorithm_through_bitsandbytes():
    """PEFT's loftq_init (peft.utils.loftq_utils) run on the CPU: bitsandbytes NF4 without double
    quantization (compress_statistics=False) + `_low_rank_decomposition`. The quantizers agree
    bit for bit (tests/test_quant_bnb_compat.py) and both SVDs are float32 LAPACK, so the
    errors agree to float32 rounding of the SVD: n * u relative."""
    F = pytest.importorskip("bitsandbytes.functional")
    from peft.utils.loftq_utils import _low_rank_decomposition

    torch.manual_seed(2)
    W, r, iters = torch.randn(64, 128) * 0.02, 8, 3
    res = W.clone()
    for _ in range(iters):
        q, st = F.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
        deq = F.dequantize_4bit(q, st)
        out = _low_rank_decomposition(W - deq, reduced_rank=r)
        res = W - out["L"] @ out["R"]
    peft_err = float((W.double() - deq.double() - out["L"].double() @ out["R"].double()).norm())
    ours = loftq_error(W, loftq(W, 4, r, iters, double_quant=False))
    assert abs(ours - peft_err) <= 128 * U32 * peft_err


@pytest.mark.parametrize("call,pattern", [
    (lambda W: loftq(W, bits=9), "bits must be an int from 2 to 8"),
    (lambda W: loftq(W, bits=1), "bits must be an int from 2 to 8"),
    (lambda W: loftq(W, bits=5), r"no 5-bit base format.*allowed: bits in \[2, 3, 4\]"),
    (lambda W: loftq(W, bits=8), r"no 8-bit base format.*allowed: bits in \[2, 3, 4\]"),
    (lambda W: loftq(W, iters=0), "iters must be an int >= 1"),
    (lambda W: pissa(W, r=17), r"r=17 is larger than min\(out, in\) = 16"),
    (lambda W: olora(W, r=0), "r must be a positive int"),
    (lambda W: pissa(W, 4, niter=-1), "niter must be None"),
    (lambda W: pissa(W, 4, scaling=0.0), "scaling must be a finite number > 0"),
    (lambda W: pissa(W[0], 1), "W must be a non-empty 2-D float tensor"),
])
def test_bad_arguments_name_the_argument(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(torch.randn(16, 24))


# ----- layers and models -----

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 32)
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


X = torch.randn(9, 32, generator=torch.Generator().manual_seed(5))


def mlp(seed=0):
    torch.manual_seed(seed)
    return MLP().eval()


def train_like(model, seed=3):
    """Stand-in for training: move every adapter factor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in ("lora_A", "lora_B"):
                for p in getattr(layer, name).parameters():
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
def test_model_output_unchanged_right_after_init(init):
    model = mlp()
    expected = model(X)
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], init=init))
    assert isinstance(model.fc1, LoRALinear) and model.fc1.lora_B["default"].weight.abs().max() > 0
    assert_close(model(X), expected, torch.float32)  # float32 rounding of W_res and of the matmuls
    assert model.fc1.initial_factors["default"][0].shape == (4, 32)


def test_pissa_niter_layer_is_deterministic_under_manual_seed():
    outs = []
    for _ in range(2):
        model = mlp()
        torch.manual_seed(7)
        apply_lora(model, LoRAConfig(r=4, target_modules=["fc1"], init="pissa_niter_2"))
        outs.append(model.fc1.lora_A["default"].weight.clone())
    assert torch.equal(*outs)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_same_start_as_peft(init):
    """PEFT's pissa_init / olora_init on the same model: same base weight and adapter product."""
    peft = pytest.importorskip("peft")
    ours, theirs = mlp(), mlp()
    apply_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], init=init))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                                                         init_lora_weights=init))
    for name in ("fc1", "fc2"):
        mine, peft_layer = getattr(ours, name), pm.base_model.model.get_submodule(name)
        W = mine.base_layer.weight
        tol = svd_tol(W, 1e-1) if init == "pissa" else 1e-5
        torch.testing.assert_close(W, peft_layer.base_layer.weight, atol=tol, rtol=0)
        torch.testing.assert_close(mine.lora_B["default"].weight @ mine.lora_A["default"].weight,
                                   peft_layer.lora_B["default"].weight @ peft_layer.lora_A["default"].weight,
                                   atol=tol, rtol=0)


def test_loftq_replaces_dense_targets_and_beats_plain_qlora():
    model = mlp()
    expected = model(X)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], init="loftq", loftq_iter=2))
    assert isinstance(model.fc1, QLoRALinear) and model.fc1.base_layer.compute_dtype == torch.float32
    assert model.fc1.lora_A["default"].weight.requires_grad
    plain = quantize_model(mlp(), ["fc1", "fc2"], compute_dtype=torch.float32)
    apply_lora(plain, LoRAConfig(r=4, alpha=8, target_modules=["fc1", "fc2"]))
    assert (model(X) - expected).norm() < (plain(X) - expected).norm()
    for name in ("fc1", "fc2"):  # the weight error too
        W = getattr(mlp(), name).weight.double()
        layer, other = getattr(model, name), getattr(plain, name)
        ours = (W - layer.base_layer.dequantize(torch.float32).double() - layer.get_delta_weight("default")).norm()
        assert ours < (W - other.base_layer.dequantize(torch.float32).double()).norm()


def test_merge_unmerge_after_init():
    model = mlp()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], init="pissa"))
    train_like(model)
    before = model(X)
    for _, layer in lora_layers(model):
        layer.merge()
    assert_close(model(X), before, torch.float32)
    for _, layer in lora_layers(model):
        layer.unmerge()
    assert_close(model(X), before, torch.float32)
    loftq_model = mlp()
    apply_lora(loftq_model, LoRAConfig(r=4, alpha=8, target_modules=["fc1"], init="loftq"))
    train_like(loftq_model)
    before = loftq_model(X)
    loftq_model.fc1 = loftq_model.fc1.merge_and_unload()  # dense merge: no re-quantization error
    assert_close(loftq_model(X), before, torch.float32)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_file_on_original_base_gives_trained_outputs_here_and_in_peft(init, tmp_path):
    peft = pytest.importorskip("peft")
    original = mlp()
    model = mlp()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["fc1", "fc2"], init=init, rslora=init == "olora"))
    train_like(model)
    trained = model(X)
    save_adapter(model, tmp_path / "conv", convert_to_lora=True)
    config = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8
    fresh = copy.deepcopy(original)
    load_adapter(fresh, tmp_path / "conv")
    # both sides are float32 sums of ~in + 2r terms: K * u * scale < 1e-5 * scale (reference.TOL)
    assert_close(fresh(X), trained, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "conv").eval()
    assert_close(pm(X), trained, torch.float32)


def test_unconverted_file_refuses_the_original_base(tmp_path):
    model = mlp()
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["fc1"], init="pissa"))
    train_like(model)
    trained = model(X)
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    original = mlp()
    before = weights(original)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'.*rewritten_base=True"):
        load_adapter(original, tmp_path)
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())
    assert not list(lora_layers(original))
    residual = mlp()  # the same init again gives the same residual base (exact SVD is deterministic)
    apply_lora(residual, LoRAConfig(r=4, alpha=8, target_modules=["fc1"], init="pissa"))
    load_adapter(residual, tmp_path, rewritten_base=True)
    assert_close(residual(X), trained, torch.float32)


def test_loftq_adapter_cannot_be_converted(tmp_path):
    model = mlp()
    apply_lora(model, LoRAConfig(r=4, target_modules=["fc1"], init="loftq"))
    with pytest.raises(ValueError, match="cannot convert a LoftQ adapter"):
        save_adapter(model, tmp_path, convert_to_lora=True)
    assert not (tmp_path / "adapter_config.json").exists()
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "loftq" and config["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    assert LoRAConfig.from_peft_dict(config).init == "loftq"


def test_pissa_on_a_quantized_model_requantizes_the_residual():
    model = quantize_model(mlp(), ["fc1", "fc2"], compute_dtype=torch.float32)
    before = model.fc1.dequantize(torch.float32)
    with pytest.warns(UserWarning, match="re-quantizes the residual"):
        apply_lora(model, LoRAConfig(r=4, target_modules=["fc1"], init="pissa"))
    layer = model.fc1
    error = layer.init_errors["default"]
    assert 0 < error < 0.15  # NF4's relative RMSE for such weights is ~0.1 (quant tests)
    rebuilt = layer.base_layer.dequantize(torch.float32) + layer.get_delta_weight("default").detach()
    rel = float((rebuilt - before).norm() / before.norm())
    assert rel <= error * float(layer.base_layer.dequantize(torch.float32).norm() / before.norm()) + 1e-6


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(init="loftq", loftq_bits=9), "loftq_bits must be an int from 2 to 8"),
    (dict(init="loftq", loftq_bits=6), r"loftq_bits=6: there is no 6-bit base format.*allowed: loftq_bits in"),
    (dict(init="loftq", loftq_bits=8), "loftq_bits=8: there is no 8-bit base format"),
    (dict(init="kaiming", loftq_bits=0), "loftq_bits must be an int from 2 to 8"),
    (dict(init="loftq", loftq_iter=0), "loftq_iter must be an int >= 1"),
    (dict(init="pissa", dora=True), "with dora=True is not supported"),
    (dict(init="pissa_niter_x"), "init must be one of"),
])
def test_bad_config_names_the_field(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        LoRAConfig(r=4, target_modules=["fc1"], **kwargs)


@pytest.mark.parametrize("config,pattern", [
    (dict(target_modules=["emb", "fc1"], init="pissa"), r"emb \(Embedding\): this init is for linear layers"),
    (dict(target_modules=["fc1", "emb"], init="loftq"), r"emb \(Embedding\): LoftQ needs a dense nn.Linear"),
    (dict(target_modules=["fc1", "fc2"], init="olora", r=20), r"fc2 \(Linear\): r=20 is larger than min"),
])
def test_bad_targets_leave_the_model_unchanged(config, pattern):
    model = mlp()
    before = weights(model)
    with pytest.raises(ValueError, match=pattern):
        apply_lora(model, LoRAConfig(**config))
    assert not list(lora_layers(model)) and isinstance(model.fc1, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layer_level_refusals():
    with pytest.raises(ValueError, match="not supported by LoRAEmbedding"):
        LoRAEmbedding.from_layer(nn.Embedding(10, 8), r=2, init="pissa")
    with pytest.raises(ValueError, match="QLoRALinear.from_loftq"):
        LoRALinear.from_linear(nn.Linear(8, 8), r=2, init="loftq")
    layer = LoRALinear.from_linear(nn.Linear(16, 12), r=2)
    nn.init.normal_(layer.lora_B["default"].weight)
    layer.merge()
    weight = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="init='pissa' on a merged layer"):
        layer.add_adapter("second", r=2, init="pissa")
    assert torch.equal(layer.base_layer.weight, weight) and layer.adapter_names == ["default"]
    layer.unmerge()
    with pytest.raises(ValueError, match="adapters \\['default'\\] of this layer were trained on"):
        layer.add_adapter("second", r=2, init="olora")
    quantized = quantize_model(mlp(), ["fc1"])
    with pytest.raises(ValueError, match="needs the full-precision weight"):
        QLoRALinear.from_layer(quantized.fc1, r=2, init="loftq")
    with pytest.raises(ValueError, match="already has adapters"):
        model = mlp()
        apply_lora(model, LoRAConfig(r=2, target_modules=["fc1"]))
        apply_lora(model, LoRAConfig(r=2, target_modules=["fc1"], init="pissa"), adapter_name="p")


def test_tied_weight_is_not_rewritten():
    model = mlp()
    model.head = nn.Linear(32, 10, bias=False)
    model.head.weight = model.emb.weight  # tied: (10, 32)
    with pytest.raises(ValueError, match="tied to"):
        apply_lora(model, LoRAConfig(r=2, target_modules=["head"], init="pissa"))


def test_pissa_on_a_conv1d_base_keeps_its_in_out_layout():
    """GPT-2's Conv1D stores its weight (in, out): the init factors W^T and writes the residual back transposed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(48, 32)  # nf=out, nx=in
    nn.init.normal_(conv.weight, std=0.1)
    W0 = conv.weight.detach().clone()  # (in, out)
    expected = conv(X)
    layer = LoRALinear.from_layer(conv, r=4, alpha=8, init="pissa")
    assert layer.fan_in_fan_out and conv.weight.shape == (32, 48)
    assert_close(layer(X), expected, torch.float32)
    delta = layer.get_delta_weight("default").detach().double()  # (in, out), as the base
    torch.testing.assert_close(torch.linalg.svdvals(delta)[:4], torch.linalg.svdvals(W0.double())[:4],
                               atol=svd_tol(W0, 1e-2), rtol=0)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_top_r_svd_gram_matches_float64_svd(shape):
    """Gram-matrix eigenvectors (LoftQ's fast path) against the float64 SVD: singular values to
    u * n * (s_1 / s_i)^2 relative (squaring), and the rank-r fit leaves the Eckart-Young error
    sqrt(sum_{i>r} s_i^2) up to n * u * ||M||; wide and tall inputs alike."""
    from lora.init import top_r_svd, top_r_svd_gram

    torch.manual_seed(3)
    M, r = torch.randn(shape) * 0.02, 8
    S64 = torch.linalg.svdvals(M.double())
    n = min(shape)
    for fn in (top_r_svd, top_r_svd_gram):
        U, S, Vh = fn(M, r)
        assert U.shape == (shape[0], r) and S.shape == (r,) and Vh.shape == (r, shape[1])
        bound = n * U32 * float((S64[0] / S64[r - 1]) ** 2)
        torch.testing.assert_close(S.double(), S64[:r], rtol=bound, atol=0.0)
        fit = float((M.double() - (U.double() * S.double()) @ Vh.double()).norm())
        assert abs(fit - float(S64[r:].square().sum().sqrt())) <= n * U32 * float(M.double().norm()) * 10


def test_top_r_svd_gram_falls_back_on_rank_deficient_input():
    """Rank 2 with r = 4: s_3 = s_4 = 0, so the Gram path would divide by zero; the exact SVD answers."""
    from lora.init import top_r_svd_gram

    torch.manual_seed(4)
    M = torch.randn(40, 2) @ torch.randn(2, 30)
    U, S, Vh = top_r_svd_gram(M, 4)
    assert torch.isfinite(U).all() and torch.isfinite(Vh).all()
    torch.testing.assert_close((U * S) @ Vh, M, rtol=0, atol=30 * U32 * float(M.abs().max()) * 10)
