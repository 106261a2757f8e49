"""Decoder-only Transformer, Llama-compatible, with a static KV cache as its decode state.

Pre-norm blocks of RMSNorm -> grouped-query attention with rotary positions ->
residual, RMSNorm -> SwiGLU MLP -> residual; a final RMSNorm and the ``lm_head``.
No biases. With ``model.transformer.qk_norm`` off (the default) the weights map
one to one onto Hugging Face's ``LlamaForCausalLM`` (lmforge/export/hf_llama.py).

``model.transformer.{norm,pos,mlp,bias}`` select GPT-2's pieces instead (LayerNorm,
learned absolute positions ``pos_emb``, a 2-matrix GELU MLP ``mlp.{up,down}``, biases);
``mlp=relu2`` is the same 2-matrix MLP with squared ReLU. The defaults are Llama's.

Usage::

    from lmforge.config import ModelConfig
    from lmforge.models.transformer import Transformer
    model = Transformer(ModelConfig(vocab_size=2048, context=256))
    logits, loss = model(idx, targets)                  # idx, targets: (B, T)

Parameter names: ``tok_emb``, ``layers.{i}.attn_norm``, ``layers.{i}.attn.{q,k,v,o}``,
``layers.{i}.mlp_norm``, ``layers.{i}.mlp.{gate,up,down}``, ``norm``, ``lm_head``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models.base import DecodeState, LanguageModel
from lmforge.models.layers import Packed, RMSNorm, Rotary, make_lm_head

# scaled_dot_product_attention repeats K/V heads itself (no copy) from torch 2.5 on.
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """MLP width: ``model.transformer.ffn_hidden``, else 8/3 * d_model rounded up to a multiple of 32 for
    SwiGLU (same parameters as a 4x 2-matrix MLP) and 4 * d_model for the 2-matrix MLPs."""
    if cfg.transformer.ffn_hidden is not None:
        return cfg.transformer.ffn_hidden
    if cfg.transformer.mlp != "swiglu":
        return 4 * cfg.d_model
    return 32 * -(-8 * cfg.d_model // (3 * 32))


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The block / final norm that ``model.transformer.norm`` names (LayerNorm carries a bias, as GPT-2's)."""
    eps = cfg.transformer.norm_eps
    return nn.LayerNorm(cfg.d_model, eps=eps) if cfg.transformer.norm == "layernorm" else RMSNorm(cfg.d_model, eps)


@dataclass
class Ragged:
    """Where the new tokens of rows at different lengths go, computed once per step for every layer."""

    positions: Tensor  # (B, T) int64: absolute position of each new token
    span: int  # key columns to attend over: the longest row after this step
    mask: Tensor  # (B, 1, T, span) bool, True = attend: column j <= the query's position

    @staticmethod
    def of(lens: Tensor, t: int, span: int, device: torch.device) -> Ragged:
        positions = (lens[:, None] + torch.arange(t)[None, :]).to(device)  # (B, T)
        columns = torch.arange(span, device=device)  # (span,)
        mask = columns[None, None, :] <= positions[:, :, None]  # (B, T, span)
        return Ragged(positions, span, mask[:, None])


def kv_buffers(state: DecodeState) -> tuple[list[Tensor], list[Tensor]]:
    """The per-layer key and value buffers ``(B, n_kv_heads, context, head_dim)`` of a Transformer state."""
    n = len(state.tensors) // 2
    return list(state.tensors[:n]), list(state.tensors[n:])


class NoRotation(nn.Module):
    """Stands in for :class:`Rotary` when positions are learned embeddings: queries and keys pass unchanged."""

    def forward(self, x: Tensor, start: int | Tensor) -> Tensor:
        return x

    def reset(self) -> None:
        pass


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions and an optional KV cache."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        t = cfg.transformer
        self.n_heads = t.n_heads
        self.n_kv_heads = t.n_kv_heads or t.n_heads
        self.head_dim = cfg.d_model // t.n_heads
        self.dropout = cfg.dropout
        self.q = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=t.bias)
        self.k = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=t.bias)
        self.v = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=t.bias)
        self.o = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=t.bias)
        # Per-head norms on queries and keys keep attention logits bounded (not in Llama; export refuses).
        self.q_norm = RMSNorm(self.head_dim, t.norm_eps) if t.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, t.norm_eps) if t.qk_norm else None

    def forward(self, x: Tensor, rotary: Rotary, cache: tuple[Tensor, Tensor] | None = None,
                pos: int | Ragged | Packed = 0) -> Tensor:
        b, t, _ = x.shape
        # Queries and keys are rotated in the projection's own (B, T, heads, hd) layout, where the
        # elementwise work runs on contiguous memory rather than on the transposed view.
        q = self.q(x).view(b, t, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.k(x).view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = self.v(x).view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)

        mask: Tensor | None = None
        causal = True
        if isinstance(pos, Ragged):
            # Rows at different lengths: each writes its new keys at its own columns and sees only its own.
            assert cache is not None, "per-row positions exist only while decoding"
            q, k = rotary(q, pos.positions).transpose(1, 2), rotary(k, pos.positions)  # q: (B, nh, T, hd)
            k_buf, v_buf = cache
            rows = torch.arange(b, device=x.device)[:, None].expand(b, t)  # (B, T)
            # Advanced indices on dims 0 and 2 put (B, T) first: the slot shape is (B, T, nkv, hd).
            k_buf[rows, :, pos.positions] = k.to(k_buf.dtype)
            v_buf[rows, :, pos.positions] = v.to(v_buf.dtype)
            k = k_buf[:, :, : pos.span].to(q.dtype)  # (B, nkv, span, hd)
            v = v_buf[:, :, : pos.span].to(q.dtype)
            mask, causal = pos.mask, False
        elif isinstance(pos, Packed):
            q, k = rotary(q, pos.positions).transpose(1, 2), rotary(k, pos.positions).transpose(1, 2)
            v, mask, causal = v.transpose(1, 2), pos.mask, False  # (B, h, T, hd); block-diagonal causal
        else:
            q, k, v = rotary(q, pos).transpose(1, 2), rotary(k, pos).transpose(1, 2), v.transpose(1, 2)  # (B, h, T, hd)
            if cache is not None:
                k_buf, v_buf = cache
                k_buf[:, :, pos : pos + t] = k.to(k_buf.dtype)
                v_buf[:, :, pos : pos + t] = v.to(v_buf.dtype)
                k = k_buf[:, :, : pos + t].to(q.dtype)  # (B, nkv, pos+T, hd)
                v = v_buf[:, :, : pos + t].to(q.dtype)
                if pos > 0:
                    causal = False
                    if t > 1:
                        # Query i sits at absolute position pos + i and may see keys 0 .. pos + i.
                        q_pos = torch.arange(pos, pos + t, device=x.device)[:, None]  # (T, 1)
                        k_pos = torch.arange(pos + t, device=x.device)[None, :]  # (1, pos+T)
                        mask = k_pos <= q_pos  # (T, pos+T), True = attend

        extra = {}
        if self.n_kv_heads != self.n_heads:
            if _SDPA_GQA:
                extra["enable_gqa"] = True
            else:
                rep = self.n_heads // self.n_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nh, S, hd)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal, **extra
        )  # (B, nh, T, hd)
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``: Llama's gated MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden, bias = ffn_hidden_size(cfg), cfg.transformer.bias
        self.gate = nn.Linear(cfg.d_model, hidden, bias=bias)
        self.up = nn.Linear(cfg.d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class TwoLayerMLP(nn.Module):
    """``down(act(up(x)))`` with GPT-2's tanh-approximated GELU (``mlp=gelu``) or squared ReLU (``mlp=relu2``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden, bias = ffn_hidden_size(cfg), cfg.transformer.bias
        self.relu2 = cfg.transformer.mlp == "relu2"
        self.up = nn.Linear(cfg.d_model, hidden, bias=bias)
        self.down = nn.Linear(hidden, cfg.d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)  # (B, T, hidden)
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh")
        return self.down(h)


class Block(nn.Module):
    """Pre-norm Transformer block: attention and MLP, each added onto the residual stream."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = SwiGLU(cfg) if cfg.transformer.mlp == "swiglu" else TwoLayerMLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rotary: Rotary, cache: tuple[Tensor, Tensor] | None = None,
                pos: int | Ragged | Packed = 0) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), rotary, cache, pos))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(LanguageModel):
    """Llama-style decoder-only Transformer (see the module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        learned = cfg.transformer.pos == "learned"
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model) if learned else None
        self.rotary: Rotary | NoRotation = (
            NoRotation() if learned
            else Rotary(cfg.d_model // cfg.transformer.n_heads, cfg.context, cfg.transformer.rope_theta))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = make_lm_head(self.tok_emb, cfg.tie_embeddings)
        self.init_weights()

    def residual_projections(self) -> list[nn.Module]:
        return [m for layer in self.layers for m in (layer.attn.o, layer.mlp.down)]

    def init_weights(self) -> None:
        super().init_weights()
        self.rotary.reset()

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``doc_ids`` (B, T), optional: packed rows (fine-tuning), one id per example; each example is
        then attended to and positioned as if it were alone in its row."""
        self._check_idx(idx)
        if idx.shape[1] > self.cfg.context:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than model.context ({self.cfg.context})")
        pos: int | Packed = 0 if doc_ids is None else Packed.of(doc_ids)
        x = self._embed(idx, pos)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, self.rotary, None, pos)
        return self.head_loss(self.norm(x), targets)

    def _embed(self, idx: Tensor, pos: int | Ragged | Packed = 0) -> Tensor:
        """Token embeddings of ``idx`` (B, T), plus the learned position embeddings when ``pos=learned``."""
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is None:
            return x
        if isinstance(pos, Ragged | Packed):
            return x + self.pos_emb(pos.positions)  # (B, T): decode rows or packed examples, each its own
        return x + self.pos_emb(torch.arange(pos, pos + idx.shape[1], device=idx.device))  # (T,) for every row

    def flops_per_token(self) -> float:
        """``6 * N_matmul + 12 * n_layers * d_model * context`` (PaLM, appendix B).

        ``N_matmul`` counts the weights of every matmul: per layer q, k, v, o
        (``d*d + 2*d*kv_dim + d*d``) and the MLP (``3*d*ffn_hidden`` for SwiGLU, ``2*d*ffn_hidden``
        for the 2-matrix MLPs), plus the ``lm_head`` (``d*V``); the embedding lookups cost none.
        The attention term counts ``QK^T`` and ``AV`` over the full context (causal masking not subtracted).
        """
        cfg = self.cfg
        d, n_layers = cfg.d_model, cfg.n_layers
        head_dim = d // cfg.transformer.n_heads
        kv_dim = (cfg.transformer.n_kv_heads or cfg.transformer.n_heads) * head_dim
        mlp_matrices = 3 if cfg.transformer.mlp == "swiglu" else 2
        per_layer = 2 * d * d + 2 * d * kv_dim + mlp_matrices * d * ffn_hidden_size(cfg)
        n_matmul = n_layers * per_layer + d * cfg.vocab_size
        return float(6 * n_matmul + 12 * n_layers * d * cfg.context)

    # ---------------------------------------------------------------- decoding
    def new_state(self, batch_size: int) -> DecodeState:
        """A static KV cache: per layer, keys then values ``(B, n_kv_heads, context, head_dim)``, batch on dim 0."""
        p = self._param_like()
        attn = self.layers[0].attn
        shape = (batch_size, attn.n_kv_heads, self.cfg.context, attn.head_dim)
        bufs = tuple(torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(2 * len(self.layers)))
        return DecodeState(bufs, torch.zeros(batch_size, dtype=torch.long), batch_dim=0, capacity=self.cfg.context)

    def step(self, idx: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        """Write the new tokens' keys and values into the cache in place; rows may be at different lengths."""
        self._check_idx(idx)
        lens = state.check_step(idx)
        b, t = idx.shape
        longest = max(lens, default=0)
        pos: int | Ragged = longest
        if b and min(lens) != longest:
            pos = Ragged.of(state.lens, t, longest + t, idx.device)
        k, v = kv_buffers(state)
        x = self._embed(idx, pos)  # (B, T_new, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rotary, (k[i], v[i]), pos)
        logits = self.lm_head(self.norm(x))  # (B, T_new, V)
        return logits, state.advanced(state.tensors, t)
