"""The pure-PyTorch Llama of examples/llama.py against references written the obvious way."""
import math

import pytest
import torch

from examples.llama import Llama, LlamaConfig

TOL = {torch.float32: (2e-5, 1e-4), torch.float64: (1e-10, 1e-10)}  # dtype -> (atol, rtol)
CONFIGS = {
    "round": LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         rope_base=10000.0, max_seq_len=64),
    "odd": LlamaConfig(vocab_size=97, dim=36, n_layers=3, n_heads=3, n_kv_heads=1, ffn_dim=50,
                       rope_base=500.0, max_seq_len=64, tie_embeddings=False),
}



def tiny(name="round", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = Llama(CONFIGS[name])
    with torch.no_grad():  # non-trivial norm weights, so a missing norm would be seen
        for n, p in model.named_parameters():
            if n.endswith("layernorm.weight") or n == "model.norm.weight":
                p.uniform_(0.5, 1.5)
            elif n.endswith("embed_tokens.weight"):
                p.normal_(0, 0.3)  # nn.Embedding's N(0, 1) makes tied logits nearly one-hot
    return model.to(dtype).eval()


def reference_forward(model: Llama, idx: torch.Tensor, params: dict | None = None) -> torch.Tensor:
    """Llama in float64, written the obvious way: one row, one head at a time, RoPE as a
    complex rotation of adjacent pairs (Meta's reference code), explicit softmax.
    `params` (name -> tensor) replaces the model's parameters, e.g. to take gradients."""
    cfg = model.config
    params = params if params is not None else dict(model.named_parameters())
    sd = {k: v.double() for k, v in params.items()}
    hd = cfg.head_dim

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(x, pos):  # x (hd,)
        freqs = torch.tensor([cfg.rope_base ** (-2 * i / hd) for i in range(hd // 2)],
                             dtype=torch.float64)
        z = torch.view_as_complex(x.reshape(hd // 2, 2).contiguous())  # (hd/2,) complex
        z = z * torch.polar(torch.ones_like(freqs), pos * freqs)
        return torch.view_as_real(z).reshape(hd)  # (hd,)

    out = []
    for row in idx:
        x = sd["model.embed_tokens.weight"][row]  # (T, dim)
        T = len(row)
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            h = norm(x, sd[p + "input_layernorm.weight"])
            q, k, v = (h @ sd[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
            heads = []
            for head in range(cfg.n_heads):
                kv = head // (cfg.n_heads // cfg.n_kv_heads)
                qs = torch.stack([rope(q[t, head * hd:(head + 1) * hd], t) for t in range(T)])
                ks = torch.stack([rope(k[t, kv * hd:(kv + 1) * hd], t) for t in range(T)])
                vs = v[:, kv * hd:(kv + 1) * hd]
                scores = qs @ ks.T / math.sqrt(hd)
                scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
                heads.append(scores.softmax(-1) @ vs)
            x = x + torch.cat(heads, -1) @ sd[p + "self_attn.o_proj.weight"].T
            h = norm(x, sd[p + "post_attention_layernorm.weight"])
            gate = h @ sd[p + "mlp.gate_proj.weight"].T
            up = h @ sd[p + "mlp.up_proj.weight"].T
            x = x + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
        head_w = sd["model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"]
        out.append(norm(x, sd["model.norm.weight"]) @ head_w.T)
    return torch.stack(out)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_reference(name, dtype):
    model = tiny(name, dtype)
    idx = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(model(idx).double(), reference_forward(model, idx), atol=atol, rtol=rtol)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_match_reference(name):
    model = tiny(name, torch.float64)
    idx = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    model(idx).pow(2).mean().backward()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    reference_forward(model, idx, params).pow(2).mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad, params[n].grad, atol=1e-10, rtol=1e-8, msg=n)


def test_tied_embeddings_share_storage():
    model = tiny("round")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tiny("odd").lm_head.weight is not tiny("odd").model.embed_tokens.weight


def test_module_names_are_the_usual_ones():
    names = {n.rsplit(".", 1)[-1] for n, m in tiny().named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "lm_head"}


def greedy_without_cache(model, prompt, n):
    """Greedy decoding by re-running the whole sequence each step (no KV cache)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_generation_matches_recomputation(name):
    model = tiny(name)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3], [8, 9, 7, 9, 3]]  # different lengths: left padding
    batched = model.generate(prompts, max_new_tokens=6)
    for p, out in zip(prompts, batched, strict=True):
        assert out == greedy_without_cache(model, p, 6)
        assert model.generate([p], max_new_tokens=6)[0] == out


def test_shared_prompt_prefix_is_run_once_with_the_same_result():
    from examples.llama import shared_prefix_length

    model = tiny("odd")
    prefix = [5, 9, 2, 6, 5, 3]
    prompts = [prefix + [1, 2, 3], prefix + [4], prefix + [8, 8, 8, 8, 8], prefix[:4]]
    assert shared_prefix_length(prompts) == 3  # the last prompt keeps one token of its own
    assert shared_prefix_length(prompts[:3]) == 6 and shared_prefix_length([[1, 2]]) == 1
    for batch in (prompts, prompts[:3]):
        out = model.generate(batch, max_new_tokens=5)
        for p, o in zip(batch, out, strict=True):
            assert o == greedy_without_cache(model, p, 5)


def test_generation_stops_at_eos_per_row():
    model = tiny()
    prompts = [[1, 2, 3], [4, 5]]
    free = model.generate(prompts, max_new_tokens=8)
    eos = free[0][2]
    stopped = model.generate(prompts, max_new_tokens=8, eos_id=eos)
    assert stopped[0] == free[0][:free[0].index(eos) + 1]
    row1 = free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert stopped[1] == row1


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = tiny()
    prompts = [[1, 2, 3], [7]]

    def sample(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompts, max_new_tokens=10, temperature=1.0, generator=g, **kw)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)  # 64-token vocab, 20 draws: a collision is vanishingly unlikely
    assert sample(3, top_k=1) == model.generate(prompts, max_new_tokens=10)


def test_bad_input():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(dim=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_heads"):
        LlamaConfig(dim=30, n_heads=4, n_kv_heads=2)
    model = tiny()
    with pytest.raises(ValueError, match="prompts"):
        model.generate([[]])
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1]], temperature=-1.0)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
