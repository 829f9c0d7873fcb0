"""A small Llama in pure PyTorch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Enough to run SmolLM2 and other Llama-architecture checkpoints loaded from GGUF
files (see `gguf_loader.py`), to fine-tune them, and to generate text with a KV cache.

Module names follow Hugging Face's `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj`,
`mlp.gate_proj`, ...), so `lora.apply_lora` finds the linear layers the way it would in
a user's own model, and adapter files carry the usual key names.

One difference from Hugging Face: RoPE rotates *adjacent* pairs `(x[2i], x[2i+1])`
(the "GPT-J"/Meta layout), because GGUF files store the Q and K rows permuted for it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LlamaConfig:
    """Shape of a Llama model. Defaults are SmolLM2-135M."""

    vocab_size: int = 49152  # token embeddings; tied to the output layer when tie_embeddings
    dim: int = 576  # model width d
    n_layers: int = 30  # transformer blocks; depth costs time linearly
    n_heads: int = 9  # query heads; head_dim = dim // n_heads
    n_kv_heads: int = 3  # key/value heads (GQA, Ainslie et al. 2023); fewer = smaller KV cache
    ffn_dim: int = 1536  # SwiGLU hidden width (Shazeer 2020)
    rope_base: float = 100000.0  # RoPE theta (Su et al. 2021, sec. 3.4.2); larger = longer context
    norm_eps: float = 1e-5  # RMSNorm epsilon (Zhang & Sennrich 2019)
    max_seq_len: int = 8192  # longest sequence the RoPE table covers
    tie_embeddings: bool = True  # output layer shares the embedding matrix (saves vocab*dim params)

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                             f"({self.n_kv_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim ({self.dim // self.n_heads}) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    """`x / sqrt(mean(x^2) + eps) * weight`, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 if it already is (norms and RoPE run at least in float32)."""
    return x if x.dtype == torch.float64 else x.float()


def rope_angles(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `pos * base^(-2i/head_dim)` (RoFormer, Su et al. 2021, eq. 15).

    Computed in float64 from the positions at each call (cheap: T * head_dim / 2 values),
    so they stay exact whatever dtype the model is cast to.

    Args:
        positions: (B, T) integer positions.

    Returns:
        cos, sin: (B, 1, T, head_dim // 2) in `dtype`.
    """
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64,
                                      device=positions.device) / head_dim)  # (head_dim/2,)
    angles = positions.double()[:, None, :, None] * inv_freq  # (B, 1, T, head_dim/2)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs `(x[..., 2i], x[..., 2i+1])` by the angles in cos/sin.

    Args:
        x: (B, T, H, head_dim).
        cos, sin: (B, T, 1, head_dim // 2), already gathered at each token's position.
    """
    xf = upcast(x)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]  # (B, T, H, head_dim/2) each
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, T, H, hd/2, 2)
    return out.flatten(-2).to(x.dtype)  # (B, T, H, head_dim): pairs back in adjacent slots


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0, packing=None):
        """x: (B, T, dim); cos/sin: (B, 1, T, head_dim/2); mask: None (causal) or a
        boolean (B, 1, T, S) of allowed keys; cache: a `KVCache` or None.
        With a `Packing`: x (N, dim) and cos/sin (N, 1, head_dim/2), the batch's computed tokens."""
        if packing is not None:
            return self._forward_packed(x, cos, sin, packing)
        B, T, _ = x.shape
        cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, hd/2)
        # RoPE before the head transpose: q stays (B, T, H, hd) in memory, so attention's output
        # does too, and the reshape for o_proj below is a view, not a second saved copy.
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), cos, sin)  # (B, T, H, hd)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)  # (B, T, Hkv, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, hd): all keys so far
        # enable_gqa: query head h reads kv head h // (H / Hkv) without repeating k and v
        # (a repeat would be saved for backward: 2 * (H - Hkv) * hd more floats per token).
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.o_proj(y)

    def _forward_packed(self, x, cos, sin, packing: "Packing"):
        """Projections and RoPE on the N computed tokens; attention on the rows laid out
        again (B, T), causal, so no real token sees a pad (attention is the only place
        where tokens meet, and on these short rows the cheaper place for padding)."""
        N = x.shape[0]
        B, T = packing.index.shape
        rows = packing.index.flatten()  # (B * T,): the computed token each position reads
        q = apply_rope(self.q_proj(x).view(N, self.n_heads, self.head_dim), cos, sin)  # (N, H, hd)
        k = apply_rope(self.k_proj(x).view(N, self.n_kv_heads, self.head_dim), cos, sin)  # (N, Hkv, hd)
        v = self.v_proj(x).view(N, self.n_kv_heads, self.head_dim)  # (N, Hkv, hd)
        # index_select: its backward adds the rows' gradients into a shared prefix token
        q, k, v = (t.index_select(0, rows).view(B, T, *t.shape[1:]).transpose(1, 2)
                   for t in (q, k, v))  # (B, heads, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B * T, self.n_heads * self.head_dim)  # (B * T, H * hd)
        return self.o_proj(y.index_select(0, packing.source))  # (N, dim)


class MLP(nn.Module):
    """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))` (Shazeer 2020)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0, packing=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, packing)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """Embeddings, blocks and the final norm (Hugging Face's `LlamaModel`)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class KVCache:
    """Keys and values of every layer for a batch, grown as tokens are generated.

    `valid` (B, S) marks real tokens; left padding of a batch of prompts is False there.
    """

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.valid: torch.Tensor | None = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (B, Hkv, T, hd) for `layer`; return all keys and values so far."""
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)  # (B, Hkv, S_old + T, hd)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def expand(self, batch: int) -> None:
        """Share a cache computed for one sequence (a common prompt prefix) with `batch` rows."""
        self.k = [k.expand(batch, -1, -1, -1) for k in self.k]  # (batch, Hkv, S, hd), no copy
        self.v = [v.expand(batch, -1, -1, -1) for v in self.v]


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Length of the token prefix common to all prompts, leaving each at least one token."""
    n = min(len(p) for p in prompts) - 1
    first = prompts[0]
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return max(n, 0)


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, P) left-padded with 0, and a boolean (B, P) marking the real tokens."""
    B, P = len(prompts), max(len(p) for p in prompts)
    idx = torch.zeros(B, P, dtype=torch.long, device=device)  # (B, P)
    valid = torch.zeros(B, P, dtype=torch.bool, device=device)  # (B, P)
    for b, p in enumerate(prompts):
        idx[b, P - len(p):] = torch.tensor(p, device=device)
        valid[b, P - len(p):] = True
    return idx, valid


@dataclass
class Packing:
    """Which positions of a right-padded batch (B, T) are computed, and where each row reads them.

    Padding-free training (as flash-attn's varlen kernels and Hugging Face's
    `DataCollatorWithFlattening`): embeddings, norms, linears and the MLP run on the N
    computed tokens (N, dim); only attention lays the rows out again. A row's positions from
    its length on are pads: with causal attention no real token sees them, so they are not
    computed. The prefix every row shares (a chat template, an instruction) is computed once,
    in row 0: with causal attention its hidden states are the same in every row, and in
    backward the rows' gradients add up in that one copy (`index_select`'s backward).
    """

    source: torch.Tensor  # (N,) flat position b * T + t of each computed token, row by row
    index: torch.Tensor  # (B, T) the computed token position (b, t) reads (a pad reads token 0: never seen)
    valid: torch.Tensor  # (B, T) bool, t < lengths[b]

    @classmethod
    def of(cls, idx: torch.Tensor, lengths: torch.Tensor, share_prefix: bool = True) -> "Packing":
        """The packing of token ids `idx` (B, T) whose row b holds `lengths[b]` real tokens."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            raise ValueError(f"idx must be a (B, T) tensor of token ids with lengths, got "
                             f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
        B, T = idx.shape
        if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64) \
                or tuple(lengths.shape) != (B,):
            got = f"{lengths.dtype} {tuple(lengths.shape)}" if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise TypeError(f"lengths must be an int64 or int32 tensor of shape ({B},) (one per row), got {got}")
        lengths = lengths.to(idx.device)
        if B and not bool(((lengths >= 1) & (lengths <= T)).all()):
            raise ValueError(f"lengths must be between 1 and T={T} (right padding), got {lengths.tolist()}")
        steps = torch.arange(T, device=idx.device)  # (T,)
        valid = steps < lengths[:, None]  # (B, T)
        shared = 0  # leading positions where every row holds the same real token
        if share_prefix and B > 1:
            differs = (~(idx == idx[:1]).all(0)).nonzero()  # (k, 1) positions where some row differs
            shared = min(int(differs[0]) if len(differs) else T, int(lengths.min()))
        own = valid.clone()  # (B, T): computed in this row
        own[1:, :shared] = False
        source = own.flatten().nonzero().squeeze(1)  # (N,)
        index = torch.zeros(B * T, dtype=torch.long, device=idx.device)  # (B * T,)
        index[source] = torch.arange(source.numel(), device=idx.device)
        index = index.view(B, T)
        index[1:, :shared] = steps[:shared]  # row 0's tokens come first: packed 0..shared-1
        return cls(source=source, index=index, valid=valid)

    @property
    def positions(self) -> torch.Tensor:
        """(N,) position of each computed token in its row."""
        return self.source % self.index.shape[1]


class Llama(nn.Module):
    """A Llama causal language model (Touvron et al. 2023)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Gradient checkpointing (Chen et al. 2016, "Training deep nets with sublinear memory
        # cost"): in training, each block keeps only its input and recomputes the rest in
        # backward, trading one more forward pass per step for activation memory. Hugging
        # Face's switch is `gradient_checkpointing_enable()`; here it is this attribute.
        self.grad_checkpointing = False

    def forward(self, idx: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the next token at every position (`lm_head` of `hidden`).

        Args:
            idx: (B, T) token ids.
            positions: (B, T) position of each token; default 0..T-1 for every row.
            mask: None for plain causal attention (right padding is harmless then),
                or a boolean (B, 1, T, S) of the keys each query may attend to.
            cache: a `KVCache`, filled in place; S counts the cached tokens too.
            last_only: compute logits at the last position only (generation needs no
                more, and the vocab projection is the costliest matmul of a long prompt).
            inputs_embeds: (B, T, dim) input embeddings instead of `idx` (prompt tuning
                prepends learned ones); pass exactly one of the two.

        Returns:
            (B, T, vocab_size) logits, or (B, 1, vocab_size) when last_only.
        """
        x = self.hidden(idx, positions, mask, cache, inputs_embeds)  # (B, T, dim)
        if last_only:
            x = x[:, -1:]  # (B, 1, dim)
        return self.lm_head(x)

    def hidden(self, idx: torch.Tensor | None = None, positions: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, cache: KVCache | None = None,
               inputs_embeds: torch.Tensor | None = None, lengths: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Final normalised hidden states (B, T, dim); arguments as `forward`.

        Training on answer tokens only can apply `lm_head` to those positions alone
        (the vocabulary projection is a fifth of this model's FLOPs).

        `lengths` (B,) int: the rows of `idx` are right-padded, row b holding `lengths[b]`
        real tokens; the layers then compute only those, and the prefix all rows share once
        (`Packing`), as fine-tuning on prompt + answer pairs needs (`examples/training.py`).
        The same states as without `lengths` at every real position (up to rounding); pads
        are 0. Plain causal positions only: no `positions`, `mask`, `cache` or `inputs_embeds`.
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) or inputs_embeds")
        if lengths is not None:
            if positions is not None or mask is not None or cache is not None or inputs_embeds is not None:
                raise ValueError("lengths (right-padded rows) takes token ids idx only: positions, mask, "
                                 "cache and inputs_embeds must be None with it")
            packing = Packing.of(idx, lengths)
            # The plain path when nothing is left out, or in a mixed-adapter batch
            # (`lora.use_adapters`), whose layers pick each row's adapter by its batch index.
            if packing.source.numel() < idx.numel() and not self._rows_routed():
                return self._hidden_packed(idx, packing)
        x = self.model.embed_tokens(idx) if inputs_embeds is None else inputs_embeds  # (B, T, dim)
        B, T = x.shape[:2]
        if positions is None:
            positions = torch.arange(T, device=x.device).expand(B, T)  # (B, T)
        if int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"sequence longer than max_seq_len={self.config.max_seq_len}")
        cfg = self.config
        cos, sin = rope_angles(positions, cfg.head_dim, cfg.rope_base, upcast(x).dtype)
        return self.model.norm(self._blocks(x, cos, sin, mask, cache))

    def _hidden_packed(self, idx: torch.Tensor, packing: Packing) -> torch.Tensor:
        """`hidden` computed on the packing's N tokens, laid out as (B, T, dim) at the end."""
        B, T = idx.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence longer than max_seq_len={self.config.max_seq_len}")
        x = self.model.embed_tokens(idx.flatten().index_select(0, packing.source))  # (N, dim)
        cos, sin = rope_angles(packing.positions[None], self.config.head_dim, self.config.rope_base,
                               upcast(x).dtype)  # (1, 1, N, hd/2) each
        cos, sin = cos[0, 0, :, None], sin[0, 0, :, None]  # (N, 1, hd/2): per token, all heads
        x = self.model.norm(self._blocks(x, cos, sin, packing=packing))  # (N, dim)
        out = x.index_select(0, packing.index.flatten()).view(B, T, -1)  # (B, T, dim)
        return out.masked_fill(~packing.valid[..., None], 0)

    def _rows_routed(self) -> bool:
        """Whether a mixed-adapter batch runs (`lora.use_adapters`: rows matter to the layers)."""
        return any(getattr(m, "row_adapters", None) is not None for m in self.modules())

    def _blocks(self, x, cos, sin, mask=None, cache=None, packing=None) -> torch.Tensor:
        """The transformer blocks, each checkpointed when `grad_checkpointing` is on."""
        if not isinstance(self.grad_checkpointing, bool):
            raise TypeError(f"grad_checkpointing must be a bool, got {self.grad_checkpointing!r}")
        # Checkpoint only when something will run backward (not in generation or no_grad).
        ckpt = self.grad_checkpointing and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.model.layers):
            if ckpt:  # use_reentrant=False: the variant PyTorch recommends (works with kwargs,
                # frozen inputs and autocast; the reentrant one needs an input requiring grad)
                x = checkpoint(block, x, cos, sin, mask, None, i, packing, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, packing)
        return x

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int = 64,
                 eos_id: int | None = None, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None,
                 prefix_embeds: torch.Tensor | None = None,
                 share_prefix: bool | None = None) -> list[list[int]]:
        """Continue a batch of prompts with a KV cache; greedy when temperature == 0.

        The tokens all prompts share at the start (a chat template, an instruction) are
        run once for the whole batch (`share_prefix`; by default, unless a mixed-adapter
        batch is running, `lora.use_adapters`, where each row's prefix goes through its own
        adapter and so has its own keys and values); the rest are left-padded. Each row
        stops at `eos_id` (which is included in its output) or after `max_new_tokens`.
        `prefix_embeds` (p, dim), e.g. a soft prompt, goes in front of every prompt.

        Returns:
            The new tokens of each prompt (without the prompt).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        device = self.model.embed_tokens.weight.device
        cache = KVCache(self.config.n_layers)
        if share_prefix is None:
            share_prefix = not any(getattr(m, "row_adapters", None) is not None for m in self.modules())
        L = shared_prefix_length(prompts) if share_prefix else 0
        shared = [self.model.embed_tokens(torch.tensor([prompts[0][:L]], dtype=torch.long, device=device))]  # (1, L, dim)
        if prefix_embeds is not None:
            shared.insert(0, prefix_embeds.to(shared[0].dtype)[None])  # (1, p, dim)
        shared = torch.cat(shared, 1)  # (1, S0, dim): what every row starts with
        S0 = shared.shape[1]
        if S0:
            self.hidden(inputs_embeds=shared, cache=cache)  # fills the cache once
            cache.expand(len(prompts))
        idx, valid = left_pad([p[L:] for p in prompts], device)  # (B, P) each
        B, P = idx.shape
        positions = S0 + (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, P): S0 at the first real token
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()  # (P, P)
        eye = torch.eye(P, dtype=torch.bool, device=device)  # pads attend to themselves (no NaN)
        valid = torch.cat([torch.ones(B, S0, dtype=torch.bool, device=device), valid], 1)  # (B, S0 + P)
        mask = torch.cat([valid[:, None, :S0].expand(B, P, S0),  # every query sees the prefix
                          (causal & valid[:, None, S0:]) | eye], 2)  # (B, P, S0 + P)
        logits = self(idx, positions, mask.unsqueeze(1), cache, last_only=True)[:, -1]  # (B, vocab)
        next_pos = positions[:, -1] + 1  # (B,)
        out = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            tok = self._pick(logits, temperature, top_k, generator)  # (B,)
            for b in range(B):
                if not done[b]:
                    out[b].append(int(tok[b]))
            if eos_id is not None:
                done |= tok == eos_id
            if bool(done.all()):
                break
            valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
            step_mask = valid[:, None, None, :]  # (B, 1, 1, S)
            logits = self(tok[:, None], next_pos[:, None], step_mask, cache)[:, -1]  # (B, vocab)
            next_pos = next_pos + 1
        return out

    @staticmethod
    def _pick(logits, temperature, top_k, generator):
        """Greedy argmax, or a sample from softmax(logits / temperature) over the top_k."""
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)  # (B, vocab)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
