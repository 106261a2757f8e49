"""The Transformer's decode state (a static KV cache) and its fast one-token step.

:class:`KVCache` preallocates, per layer, keys and values for the whole context;
``Transformer.step`` writes each new token's keys in place. A step of one token
per row (every step of the serving engine's decode loop) runs through
:func:`decode_one` instead of the module tree. At batch 1 a small model's step is
almost all per-operation overhead, not arithmetic, so this path does the same
math in as few operations as possible:

- the block weights are held once more, fused and transposed (:class:`DecodePlan`):
  one matmul for q, k and v, one for the MLP's gate and up, and ``x + y @ W`` as one
  ``addmm`` for each residual projection; the attention scale is folded into the
  query weights;
- rotary positions turn queries and keys together with one multiply-add
  (``qk * cos + (qk @ P) * sin``, ``P`` the fixed rotate-half matrix);
- rows at one length write their keys with one copy and attend with one SDPA
  call; rows at different lengths use one indexed write and a mask.

The plan is rebuilt whenever a parameter changes (its version counter or its
storage), so training between generations or moving the model is safe. Only the
Transformer's own modules are planned: with unmerged LoRA adapters or other
wrapped projections, ``Transformer.step`` keeps the module path.

Usage (``Transformer.step`` does this; the result equals the module path within
float rounding, which tests/test_models.py checks against the full forward)::

    plan = DecodePlan.for_model(model)          # cached on the model; None for wrapped projections
    logits = decode_one(model, plan, idx, k_bufs, v_bufs, pos)   # idx (B, 1) -> (B, 1, V)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

from lmforge.models.layers import RMSNorm

if TYPE_CHECKING:
    from lmforge.models.transformer import Transformer

# Bumped by torch whenever any module or parameter is assigned anywhere (a LoRA wrapper replacing a
# projection, re-tied weights): a plan made under another epoch re-checks the model's structure.
_epoch = [0]


def _bump(*_args: object) -> None:
    # Not while torch.compile traces: a model that assigns a module or parameter inside its forward (some
    # transformers models do) would otherwise get a guard on the counter and recompile on every call.
    if not torch.compiler.is_compiling():
        _epoch[0] += 1


register_module_module_registration_hook(_bump)
register_module_parameter_registration_hook(_bump)

# A transposed copy of the output head is kept only up to this many elements (16 MB in float32): tiny
# matmuls run about 1.4x faster on a contiguous (in, out) matrix, while large ones are memory-bound.
_HEAD_COPY_LIMIT = 1 << 22


@dataclass
class Frontier:
    """Which state last wrote into the shared cache buffers (by its stamp); lets states share buffers safely."""

    stamp: int = 0


@dataclass
class KVCache:
    """Decode state: per layer, preallocated keys and values ``(B, n_kv_heads, context, head_dim)``.

    ``lens`` (B,) int64 on the CPU counts the tokens each row has seen; rows may
    differ (requests that joined a decode batch at different lengths), and row
    ``b`` keeps its keys in columns ``[0, lens[b])``. States returned by
    successive ``step`` calls share the buffers (no copy per token); stepping a
    state that is not the newest one (branching) first copies the buffers, so
    every state stays valid.
    """

    k: list[Tensor]
    v: list[Tensor]
    lens: Tensor
    frontier: Frontier = field(default_factory=Frontier)
    stamp: int = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]


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
        self.compiled: _Captured | None = None
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

    @classmethod
    def for_model(cls, model: Transformer) -> DecodePlan | None:
        """The model's cached plan (None when it cannot have one), rebuilt when any parameter changed.

        A parameter changes in place (an optimizer step bumps its version counter) or by moving
        (new storage); the parameters themselves change only by a registration, which moves the epoch.
        """
        cached: _Cached | None = model.__dict__.get("_decode_plan")
        if cached is not None and cached.epoch == _epoch[0]:
            params = cached.params
            if [p._version for p in params] == cached.versions and [p.data_ptr() for p in params] == cached.pointers:
                return cached.plan
        params = list(model.parameters())
        cached = _Cached(_epoch[0], params, [p._version for p in params], [p.data_ptr() for p in params],
                         cls(model) if cls.supports(model) else None)
        # A plain attribute, not a submodule: it never reaches the state dict or a checkpoint.
        model.__dict__["_decode_plan"] = cached
        return cached.plan


@dataclass
class _Cached:
    epoch: int
    params: list[nn.Parameter]
    versions: list[int]  # each parameter's version counter and data pointer when the plan was made
    pointers: list[int]
    plan: DecodePlan | None


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
    log-probability (B, 1), which cost next to nothing inside the graph (for :func:`greedy_steps`)."""
    positions = lens[:, None]  # (B, 1)
    mask = torch.arange(plan.context, device=idx.device)[None, None, None, :] <= positions[:, None, :, None]
    logits = decode_one(plan, idx, k_bufs, v_bufs, Ragged(positions, plan.context, mask), static=True)
    last = logits[:, -1].float()  # (B, V)
    token = last.argmax(dim=-1, keepdim=True)
    return logits, token, torch.log_softmax(last, dim=-1).gather(-1, token)


class _Captured:
    """The inductor-compiled graph of :func:`_static_one`, called with its inputs directly.

    ``torch.compile`` checks its guards and rebuilds the inputs on every call, which costs a third of a
    small model's step. The backend below keeps the compiled graph and, by identity, where each of its
    inputs comes from (a plan tensor, the token, the lengths or a cache buffer), so later calls hand the
    graph its inputs straight. When an input cannot be placed, calls go through ``torch.compile`` as usual.
    """

    def __init__(self, plan: DecodePlan) -> None:
        self.plan = plan
        self.graph: Callable[[list[Tensor]], Any] | None = None
        self.args: list[Tensor] = []
        self.slots: list[tuple[int, str, int]] = []
        self.example: tuple[Tensor, Tensor, list[Tensor], list[Tensor]] | None = None
        self.signature: tuple = ()
        self.compiled = torch.compile(_static_one, fullgraph=True, dynamic=False, backend=self._backend)

    def _backend(self, gm: torch.fx.GraphModule, inputs: list[Tensor]) -> Callable[..., Any]:
        from torch._inductor.compile_fx import compile_fx

        graph = compile_fx(gm, inputs, config_patches={"cpp_wrapper": True})
        assert self.example is not None
        idx, lens, k_bufs, v_bufs = self.example
        known = {id(idx): ("idx", 0), id(lens): ("lens", 0)}
        known.update({id(t): ("k", i) for i, t in enumerate(k_bufs)})
        known.update({id(t): ("v", i) for i, t in enumerate(v_bufs)})
        args: list[Tensor] = []
        slots: list[tuple[int, str, int]] = []  # (position in args, "idx" | "lens" | "k" | "v", layer)
        for t in inputs:
            if not isinstance(t, Tensor):
                return graph  # a symbolic size or something unplaced: keep the guarded path
            if id(t) in known:
                slots.append((len(args), *known[id(t)]))
            args.append(t)  # a plan tensor stays: the same object on every call
        if len(slots) != 2 + len(k_bufs) + len(v_bufs):  # every per-call input must have been placed
            return graph
        self.graph, self.args, self.slots = graph, args, slots
        return graph

    @staticmethod
    def _signature(idx: Tensor, k_bufs: list[Tensor], v_bufs: list[Tensor]) -> tuple:
        k = k_bufs[0]
        return (idx.shape, k.shape, k.stride(), k.dtype, k.device,
                all(t.is_contiguous() for t in k_bufs), all(t.is_contiguous() for t in v_bufs))

    def __call__(self, idx: Tensor, k_bufs: list[Tensor], v_bufs: list[Tensor], lens: Tensor) -> Tensor:
        if self.graph is None:
            self.example = (idx, lens, k_bufs, v_bufs)
            logits = self.compiled(self.plan, idx, k_bufs, v_bufs, lens)
            self.example = None
            self.signature = self._signature(idx, k_bufs, v_bufs)
            return logits
        if self._signature(idx, k_bufs, v_bufs) != self.signature:  # not what the graph was built for: no guards
            return _static_one(self.plan, idx, k_bufs, v_bufs, lens)  # protect it here, so run it eagerly
        args = list(self.args)
        for at, kind, layer in self.slots:
            args[at] = idx if kind == "idx" else lens if kind == "lens" else (k_bufs if kind == "k" else v_bufs)[layer]
        return self.graph(*args)


def compiled_one(plan: DecodePlan, idx: Tensor, k_bufs: list[Tensor], v_bufs: list[Tensor],
                 lens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_static_one` compiled by inductor (C++ wrapper) on first use for this plan."""
    if plan.compiled is None:
        plan.compiled = _Captured(plan)
    # The captured graph skips Dynamo's guards: hand it exactly the dtypes and layouts it was built for.
    return plan.compiled(idx.long().contiguous(), k_bufs, v_bufs, lens.long())


def greedy_steps(plan: DecodePlan, idx: Tensor, k_bufs: list[Tensor], v_bufs: list[Tensor], lens: Tensor,
                 n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` (at least 2) compiled one-row steps, each fed the previous one's argmax (from inside the graph).

    ``lens`` (1,) on the model's device is advanced in place. Returns the ``n - 1`` chosen tokens
    (1, n - 1), their log-probabilities (1, n - 1) and the last step's logits (1, V).
    """
    picked, logprobs = [], []
    for i in range(n):
        logits, token, logprob = compiled_one(plan, idx, k_bufs, v_bufs, lens)
        lens += 1
        if i < n - 1:
            picked.append(token)
            logprobs.append(logprob)
            idx = token
    return torch.cat(picked, dim=1), torch.cat(logprobs, dim=1), logits[:, -1]
