"""A faster decode step for lmforge's Transformer, applied by the serving engine from outside the model.

The model's own ``Transformer.step`` runs its module tree. At batch 1 a small
model's step is almost all per-operation overhead, not arithmetic, so
:class:`FastTransformer` (a :class:`~lmforge.serve.decoder.Decoder`) runs each
one-token step through :func:`decode_one`, the same math in as few operations as
possible (2.2x the tokens/s of the module path for the 1M-parameter benchmark
model on 2 CPU cores, docs/benchmarks.md):

- the block weights are held once more, fused and transposed (:class:`DecodePlan`):
  one matmul for q, k and v, one for the MLP's gate and up, and ``x + y @ W`` as one
  ``addmm`` for each residual projection; the attention scale is folded into the
  query weights;
- rotary positions turn queries and keys together with one multiply-add
  (``qk * cos + (qk @ P) * sin``, ``P`` the fixed rotate-half matrix);
- rows at one length write their keys with one copy and attend with one SDPA
  call; rows at different lengths use one indexed write and a mask.

With ``compile=True`` (``--serve.compile``) batch-1 steps also go through one
``torch.compile``-d graph with static shapes, which picks the greedy token inside
the graph with :func:`lmforge.serve.sampling.greedy_choice` (the serving engine's
lookahead then runs n steps back to back through it).

The plan is made when the engine applies the accelerator and remade when a
parameter changes in place or moves (its version counter or storage), so training
between generations is safe; a module replaced afterwards (a LoRA wrapper) is not
seen: make a new engine. Models with other projections than plain ``nn.Linear``
(unmerged LoRA) or other architectures get no accelerator (:func:`accelerate`
returns None) and decode through ``model.step``.

Usage (the engine does this; the result equals ``model.step`` within float
rounding, which tests/serve/test_fast_decode.py checks)::

    decoder = accelerate(model, compile=False)       # None when the model is not a plain Transformer
    logits, state = decoder.step(idx, state)          # idx (B, 1): the fused path; longer spans: model.step
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models.base import DecodeState
from lmforge.models.layers import RMSNorm
from lmforge.models.transformer import Ragged, Transformer, kv_buffers
from lmforge.serve.decoder import Decoder
from lmforge.serve.sampling import GreedyRun, greedy_choice

# A transposed copy of the output head is kept only up to this many elements (16 MB in float32): tiny
# matmuls run about 1.4x faster on a contiguous (in, out) matrix, while large ones are memory-bound.
_HEAD_COPY_LIMIT = 1 << 22


def _t(w: Tensor) -> Tensor:
    return w.detach().t().contiguous()


def _cat_bias(*linears: nn.Linear) -> Tensor | None:
    if linears[0].bias is None:
        return None
    return torch.cat([m.bias.detach() for m in linears])


def _fold_norm(norm: nn.Module, w: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Fold a norm's affine part into the (in, out) matrix it feeds: ``(n * g + c) @ W = n @ (g W) + c W``."""
    if isinstance(norm, nn.LayerNorm) and norm.bias is not None:
        shift = norm.bias.detach() @ w
        bias = shift if bias is None else bias + shift
    return w * norm.weight.detach()[:, None], bias


class _Norm:
    """A parameter-free RMSNorm or LayerNorm (the affine part lives in the next matrix)."""

    def __init__(self, norm: nn.Module) -> None:
        self.layer = isinstance(norm, nn.LayerNorm)
        self.eps, self.dim = float(norm.eps), int(norm.weight.shape[0])
        self.eps_t = torch.tensor(self.eps, dtype=torch.float32, device=norm.weight.device)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32:  # statistics in float32, as the module path takes them
            return self(x.float()).to(x.dtype)
        if self.layer:
            return F.layer_norm(x, (self.dim,), None, None, self.eps)
        # x / sqrt(mean(x^2) + eps) from the 2-norm: four small kernels where F.rms_norm runs eight on a CPU.
        norm = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True)
        return x * torch.addcmul(self.eps_t, norm, norm, value=1.0 / self.dim).rsqrt_()


@dataclass
class _Layer:
    qkv: Tensor  # (C, (H + 2 KV) * hd): the attention norm's weight folded in; query columns carry 1/sqrt(hd)
    qkv_bias: Tensor | None
    o: Tensor  # (H * hd, C)
    o_bias: Tensor | None
    up: Tensor  # (C, 2 F) = gate | up for SwiGLU, (C, F) otherwise; the MLP norm's weight folded in
    up_bias: Tensor | None
    down: Tensor  # (F, C)
    down_bias: Tensor | None
    q_norm: Tensor | None  # per-head weights of QK-norm (the query's carries the attention scale)
    k_norm: Tensor | None


class DecodePlan:
    """Fused, transposed copies of a Transformer's block weights for :func:`decode_one`."""

    def __init__(self, model: Transformer) -> None:
        attn0 = model.layers[0].attn
        self.n_heads, self.n_kv, self.hd = attn0.n_heads, attn0.n_kv_heads, attn0.head_dim
        self.eps = model.cfg.transformer.norm_eps
        self.mlp = model.cfg.transformer.mlp
        self.norm = _Norm(model.norm)
        self.emb = model.tok_emb.weight.detach()
        self.pos_emb = None if model.pos_emb is None else model.pos_emb.weight.detach()
        self.context = model.cfg.context
        scale = self.hd**-0.5
        q_cols = self.n_heads * self.hd
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for block in model.layers:
                a, m = block.attn, block.mlp
                qkv, qkv_bias = _t(torch.cat([a.q.weight, a.k.weight, a.v.weight])), _cat_bias(a.q, a.k, a.v)
                if a.q_norm is None:  # scores = (s q) . k: scale the query columns once, here
                    qkv[:, :q_cols] *= scale
                    if qkv_bias is not None:
                        qkv_bias[:q_cols] *= scale
                gated = self.mlp == "swiglu"
                up = _t(torch.cat([m.gate.weight, m.up.weight])) if gated else _t(m.up.weight)
                up_bias = _cat_bias(m.gate, m.up) if gated else _cat_bias(m.up)
                self.layers.append(_Layer(
                    *_fold_norm(block.attn_norm, qkv, qkv_bias), _t(a.o.weight), _cat_bias(a.o),
                    *_fold_norm(block.mlp_norm, up, up_bias), _t(m.down.weight), _cat_bias(m.down),
                    None if a.q_norm is None else a.q_norm.weight.detach() * scale,
                    None if a.k_norm is None else a.k_norm.weight.detach()))
            head = model.lm_head.weight
            # Large heads are used in place (no copy): then the final norm keeps its own weight.
            self.head_bias: Tensor | None = None
            if head.numel() <= _HEAD_COPY_LIMIT:
                self.head, self.head_bias = _fold_norm(model.norm, _t(head), None)
                self.final_norm: nn.Module | _Norm = self.norm
            else:
                self.head, self.final_norm = head.detach().t(), model.norm
            self.rotate = self.rotate_sign = self.cos = self.sin = None
            if model.pos_emb is None:
                self.cos, self.sin = model.rotary.cos.to(head.dtype), model.rotary.sin.to(head.dtype)
                # x @ rotate = rotate_half(x) = [-x2, x1]
                half = self.hd // 2
                eye = torch.eye(half, dtype=head.dtype, device=head.device)
                rotate = torch.zeros(self.hd, self.hd, dtype=head.dtype, device=head.device)
                rotate[half:, :half] = -eye
                rotate[:half, half:] = eye
                self.rotate = rotate
                self.rotate_sign = rotate.sum(0)  # rotate_half(x) = roll(x, hd/2) * [-1.., +1..]

    @staticmethod
    def supports(model: Transformer) -> bool:
        """True when every projection is a plain ``nn.Linear`` and every norm is ours or LayerNorm."""
        linears = [model.lm_head]
        norms = [model.norm]
        for block in model.layers:
            linears += [block.attn.q, block.attn.k, block.attn.v, block.attn.o, *block.mlp.children()]
            norms += [block.attn_norm, block.mlp_norm]
        return (all(type(m) is nn.Linear for m in linears)
                and all(type(n) in (RMSNorm, nn.LayerNorm) and n.weight is not None for n in norms))


def _linear(x: Tensor, w: Tensor, bias: Tensor | None, residual: Tensor | None = None) -> Tensor:
    """``residual + x @ w + bias`` in as few kernels as the arguments allow."""
    if residual is not None:
        out = torch.addmm(residual, x, w)
        return out if bias is None else out.add_(bias)
    return torch.mm(x, w) if bias is None else torch.addmm(bias, x, w)


def decode_one(plan: DecodePlan, idx: Tensor, k_bufs: list[Tensor], v_bufs: list[Tensor],
               pos: int | Ragged, static: bool = False) -> Tensor:
    """Logits ``(B, 1, V)`` of one new token per row, writing its keys and values into the buffers.

    ``pos`` is the common length of all rows, or a :class:`Ragged` for rows at different lengths.
    """
    b = idx.shape[0]
    h_, kv, hd = plan.n_heads, plan.n_kv, plan.hd
    ragged = isinstance(pos, Ragged)
    positions = pos.positions[:, 0] if ragged else None  # (B,)
    x = F.embedding(idx[:, 0], plan.emb)  # (B, C)
    if plan.pos_emb is not None:
        x = x + (plan.pos_emb[positions] if ragged else plan.pos_emb[pos])
    cos = sin = None
    if plan.cos is not None and plan.sin is not None:
        if ragged:
            cos, sin = plan.cos[positions][:, None], plan.sin[positions][:, None]  # (B, 1, hd)
        else:
            cos, sin = plan.cos[pos], plan.sin[pos]  # (hd,)
    span = pos.span if ragged else pos + 1
    mask = pos.mask if ragged else None  # (B, 1, 1, span)
    rows = torch.arange(b, device=idx.device) if ragged else None
    norm = plan.norm
    gqa = {"enable_gqa": True} if kv != h_ else {}
    for layer, k_buf, v_buf in zip(plan.layers, k_bufs, v_bufs, strict=True):
        qkv = _linear(norm(x), layer.qkv, layer.qkv_bias)  # (B, (H + 2 KV) * hd)
        qk = qkv[:, : (h_ + kv) * hd].view(b, h_ + kv, hd)
        v = qkv[:, (h_ + kv) * hd :].view(b, kv, hd)
        if layer.q_norm is not None and layer.k_norm is not None:
            qk = torch.cat((F.rms_norm(qk[:, :h_], (hd,), layer.q_norm, plan.eps),
                            F.rms_norm(qk[:, h_:], (hd,), layer.k_norm, plan.eps)), dim=1)
        if plan.rotate is not None and static:  # inductor fuses the roll; the matmul would be a library call
            qk = qk * cos + qk.roll(hd // 2, -1) * plan.rotate_sign * sin
        elif plan.rotate is not None:
            qk = torch.addcmul(qk * cos, qk @ plan.rotate, sin)
        q, k = qk[:, :h_, None], qk[:, h_:]  # (B, H, 1, hd), (B, KV, hd)
        if ragged:
            k_buf[rows, :, positions] = k.to(k_buf.dtype)
            v_buf[rows, :, positions] = v.to(v_buf.dtype)
        else:
            k_buf[:, :, pos] = k
            v_buf[:, :, pos] = v
        keys, values = k_buf[:, :, :span].to(x.dtype), v_buf[:, :, :span].to(x.dtype)  # (B, KV, span, hd)
        if static:  # products and sums that inductor fuses into one loop, where SDPA would be a library call
            qg = q.reshape(b, kv, h_ // kv, 1, hd)  # query heads grouped under their key head
            scores = (qg * keys[:, :, None]).sum(-1).masked_fill(~mask, float("-inf"))  # (B, KV, G, span)
            y = (scores.softmax(-1)[..., None] * values[:, :, None]).sum(-2)  # (B, KV, G, hd)
        else:  # the scale is already in the query (or its norm weight): pass 1
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0, **gqa)  # (B, H, 1, hd)
        x = _linear(y.reshape(b, h_ * hd), layer.o, layer.o_bias, residual=x)
        up = _linear(norm(x), layer.up, layer.up_bias)
        if plan.mlp == "swiglu":
            gate, up = up.chunk(2, dim=-1)
            up = F.silu(gate).mul_(up)
        elif plan.mlp == "relu2":
            up = F.relu(up).square_()
        else:
            up = F.gelu(up, approximate="tanh")
        x = _linear(up, layer.down, layer.down_bias, residual=x)
    return _linear(plan.final_norm(x), plan.head, plan.head_bias)[:, None]  # (B, 1, V)


def _static_one(plan: DecodePlan, idx: Tensor, k_bufs: list[Tensor], v_bufs: list[Tensor],
                lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`decode_one` with shapes that never change: every row attends over the whole context under a
    mask, so one compiled graph serves every position. Also returns each row's argmax token (B, 1) and its
    log-probability (B, 1), which cost next to nothing inside the graph (for the lookahead)."""
    positions = lens[:, None]  # (B, 1)
    mask = torch.arange(plan.context, device=idx.device)[None, None, None, :] <= positions[:, None, :, None]
    logits = decode_one(plan, idx, k_bufs, v_bufs, Ragged(positions, plan.context, mask), static=True)
    token, logprob = greedy_choice(logits[:, -1])
    return logits, token, logprob


class FastTransformer(Decoder):
    """The fused (and optionally compiled) decode step for a plain :class:`Transformer`; see the module docstring."""

    def __init__(self, model: Transformer, compile: bool = False) -> None:
        super().__init__(model)
        self.params = list(model.parameters())
        self.marks: list[tuple[int, int]] = []
        self.plan = self._plan()
        self.compiled: Callable[..., Any] | None = None
        self.compiled_steps = 0  # steps run through the compiled graph
        if compile:
            # Static shapes, one graph for every position; inductor's C++ wrapper calls the kernels with less
            # Python per step than its default one (measured: docs/benchmarks.md).
            self.compiled = torch.compile(_static_one, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})

    def _plan(self) -> DecodePlan:
        """The fused weights, remade when a parameter changed in place (its version counter) or moved."""
        # torch has no public per-tensor change counter; ``_version`` is the one autograd itself checks.
        marks = [(p._version, p.data_ptr()) for p in self.params]
        if marks != self.marks:
            self.plan, self.marks = DecodePlan(self.model), marks
        return self.plan

    def _fused(self, idx: Tensor) -> bool:
        return idx.shape[1] == 1 and not self.model.training and not torch.is_grad_enabled()

    def step(self, idx: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        if not self._fused(idx):
            return self.model.step(idx, state)  # a prefill or a span: the module path
        self.model._check_idx(idx)
        lens = state.check_step(idx)
        k, v = kv_buffers(state)
        plan = self._plan()
        if self.compiled is not None and idx.shape[0] == 1:
            logits = self._compiled_one(plan, idx, k, v, state.lens.to(idx.device))[0]
        else:
            longest = max(lens, default=0)
            pos = longest if min(lens, default=0) == longest else Ragged.of(state.lens, 1, longest + 1, idx.device)
            logits = decode_one(plan, idx, k, v, pos)
        return logits, state.advanced(state.tensors, 1)

    def greedy(self, idx: Tensor, state: DecodeState, n: int) -> GreedyRun:
        """With the compiled one-row step, the ``n`` steps run back to back through the graph, which also
        picks the argmax; anything else takes the plain loop over :meth:`step`."""
        if (self.compiled is None or n < 2 or tuple(idx.shape) != (1, 1) or not self._fused(idx)
                or int(state.lens[0]) + n > (state.capacity or 0)):
            return super().greedy(idx, state, n)
        self.model._check_idx(idx)
        k, v = kv_buffers(state)
        plan = self._plan()
        lens = state.lens.to(idx.device, copy=True)
        picked, logprobs = [], []
        for i in range(n):
            logits, token, logprob = self._compiled_one(plan, idx, k, v, lens)
            lens += 1
            if i < n - 1:
                picked.append(token)
                logprobs.append(logprob)
                idx = token
        return torch.cat(picked, dim=1), torch.cat(logprobs, dim=1), logits[:, -1], state.advanced(state.tensors, n)

    def _compiled_one(self, plan: DecodePlan, idx: Tensor, k: list[Tensor], v: list[Tensor],
                      lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        assert self.compiled is not None
        self.compiled_steps += 1
        return self.compiled(plan, idx.long().contiguous(), k, v, lens.long())

def accelerate(model: nn.Module, compile: bool = False) -> FastTransformer | None:
    """A :class:`FastTransformer` for a plain lmforge Transformer (:meth:`DecodePlan.supports`), else None."""
    if isinstance(model, Transformer) and DecodePlan.supports(model):
        return FastTransformer(model, compile)
    return None
