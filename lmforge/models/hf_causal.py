"""Any causal LM that Hugging Face ``transformers`` builds, behind lmforge's model contract (``model.arch=hf``).

The wrapped module is the family's own code, built from its own config
(``AutoModelForCausalLM.from_config`` on ``model.hf_config``, the model's ``config.json`` as a
mapping), so what it computes is exactly what transformers computes: Llama 3.x with scaled
rotary positions, Qwen2/2.5 with query/key/value biases, Qwen3 and Gemma with their own
head width, Gemma's sliding-window layers and soft-capping, Phi-3, Mistral, GPT-2, ...

- ``forward(idx, targets)`` runs the transformers model and returns lmforge's loss
  (:func:`~lmforge.models.layers.causal_lm_loss`, mean over targets that are not -100), so the
  training loop, evaluation and fine-tuning run on it unchanged.
- Packed fine-tuning (``forward(idx, targets, doc_ids)``, ``finetune.pack``): several examples share a
  row; transformers gets per-token ``position_ids`` restarting at 0 in each example and an explicit
  block-diagonal causal mask (:class:`~lmforge.models.layers.Packed`, cut to the family's sliding
  window on its windowed layers), so each example's logits are those it gets alone. Only families
  whose every layer is full or sliding-window attention take packed rows (:func:`packs_examples`):
  a recurrent, convolution or chunked-attention layer would carry across the boundaries.
- Decoding goes through the family's own attention and its key/value cache interface: the
  :class:`~lmforge.models.base.DecodeState` holds, per attention layer, a key and a value
  buffer ``(B, n_kv_heads, capacity, head_dim)`` (the batch on dimension 0), a row keeping
  its keys in columns ``[0, lens[b])`` like lmforge's own Transformer. Each ``step`` hands
  transformers a :class:`RowCache` that writes the new keys of each row at that row's own
  positions, with per-row ``position_ids`` and an explicit attention mask (causal, and the
  family's sliding window on the layers that have one), so rows of different lengths, joined
  mid-way by the server, decode together with no padding.

The buffers' shapes are read once from a one-token pass through transformers' own dynamic
cache (:meth:`HFCausalLM.kv_shapes`); a family whose layers do not keep keys and values there
(state-space or linear-attention layers) raises a ValueError saying it cannot decode step by
step. ``transformers`` is imported lazily, when such a model is built::

    cfg = ModelConfig(arch="hf", vocab_size=151936, hf_config=json.load(open("qwen/config.json")))
    model = HFCausalLM(cfg)                 # random weights, the family's own init
    logits, loss = model(idx, targets)
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.config import ConfigError, ModelConfig
from lmforge.models.base import DecodeState, LanguageModel
from lmforge.models.layers import Packed, causal_lm_loss


def hf_config_object(hf_config: dict[str, Any], vocab_size: int | None = None, tie: bool | None = None) -> Any:
    """The transformers config object of ``hf_config`` (a ``config.json`` mapping), with lmforge's
    ``model.vocab_size`` and ``model.tie_embeddings`` laid over it when given (they size the tokenizer's side)."""
    from transformers import CONFIG_MAPPING

    model_type = hf_config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"model.hf_config: model_type {model_type!r} is not a family this transformers knows")
    config = CONFIG_MAPPING[model_type].from_dict(dict(hf_config))
    if vocab_size:
        config.get_text_config().vocab_size = vocab_size
    if tie is not None:
        config.tie_word_embeddings = tie
    return config


# The layer kinds an explicit attention mask fully governs: nothing else flows between positions.
MASKED_KINDS = frozenset({"full_attention", "sliding_attention"})


def packs_examples(hf_config: dict[str, Any]) -> bool:
    """Whether packed rows keep their examples apart in this family (``model.hf_config``): every layer is
    full or sliding-window attention, the attention the mask of :meth:`HFCausalLM.forward` governs.
    A family with no attention heads at all (RWKV, xLSTM) lists no layer kinds, so it is asked for its heads."""
    config = hf_config_object(hf_config).get_text_config()
    kinds = getattr(config, "layer_types", None) or ["full_attention"]
    return bool(getattr(config, "num_attention_heads", None)) and set(kinds) <= MASKED_KINDS


@functools.cache
def _row_layer() -> type:
    """transformers' cache-layer interface over one layer of lmforge's decode state (built once, lazily)."""
    from transformers.cache_utils import CacheLayerMixin

    class RowLayer(CacheLayerMixin):
        """One attention layer's keys and values, each row at its own columns of a preallocated buffer."""

        def __init__(self, k_buf: Tensor, v_buf: Tensor, positions: Tensor, span: int) -> None:
            super().__init__()
            self.k_buf, self.v_buf = k_buf, v_buf  # (B, nkv, capacity, hd)
            self.positions, self.span = positions, span  # (B, T) where the new keys go; columns to attend over
            self.is_initialized = True

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            pass

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            # key_states: (B, nkv, T, hd). Advanced indices on dims 0 and 2 put (B, T) first: slots are (B, T, nkv, hd).
            pos = self.positions
            rows = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)
            self.k_buf[rows, :, pos] = key_states.transpose(1, 2).to(self.k_buf.dtype)
            self.v_buf[rows, :, pos] = value_states.transpose(1, 2).to(self.v_buf.dtype)
            self.keys, self.values = self.k_buf[:, :, : self.span], self.v_buf[:, :, : self.span]
            return self.keys.to(key_states.dtype), self.values.to(value_states.dtype)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.span, 0

        def get_seq_length(self) -> int:
            return self.span - self.positions.shape[1]

        def get_max_length(self) -> int:
            return int(self.k_buf.shape[2])

    return RowLayer


def _row_cache(keys: list[Tensor], values: list[Tensor], positions: Tensor, span: int) -> Any:
    """A transformers ``Cache`` whose layer ``i`` writes into ``keys[i]`` / ``values[i]`` at each row's positions."""
    from transformers.cache_utils import Cache

    layer = _row_layer()
    return Cache(layers=[layer(k, v, positions, span) for k, v in zip(keys, values, strict=True)])


class HFCausalLM(LanguageModel):
    """A transformers causal LM (``self.hf``) as a registry model; see the module docstring."""

    def __init__(self, cfg: ModelConfig, hf_model: nn.Module | None = None) -> None:
        """Build the family's model from ``cfg.hf_config`` with fresh weights, or wrap ``hf_model`` (already loaded)."""
        super().__init__(cfg)
        if not cfg.hf_config:
            raise ConfigError("model.arch=hf needs model.hf_config (a Hugging Face config.json as a mapping); "
                              "lmforge sets it when it opens a Hugging Face model folder")
        if hf_model is None:
            from transformers import AutoModelForCausalLM

            config = hf_config_object(cfg.hf_config, cfg.vocab_size, cfg.tie_embeddings)
            hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.hf = hf_model
        self._kv: list[tuple[int, int]] | None = None  # (n_kv_heads, head_dim) per cache layer, read once
        params = inspect.signature(self.hf.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x

    # The contract names the embedding and the head; here they are transformers' own modules.
    @property
    def tok_emb(self) -> nn.Module:  # type: ignore[override]
        return self.hf.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:  # type: ignore[override]
        return self.hf.get_output_embeddings()

    @property
    def text_config(self) -> Any:
        return self.hf.config.get_text_config()

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``doc_ids`` (B, T), optional: packed rows (fine-tuning), one id per example; each example is then
        attended to and positioned as if it were alone in its row (see the module docstring)."""
        self._check_idx(idx)
        if doc_ids is None:
            logits = self.hf(input_ids=idx, use_cache=False).logits  # (B, T, V)
        else:
            packed = Packed.of(doc_ids)
            columns = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)  # (B, T): each query's column
            masks = self._masks(columns, packed.mask, self._param_like().dtype)
            logits = self.hf(input_ids=idx, position_ids=packed.positions, attention_mask=masks,
                             use_cache=False).logits
        return logits, None if targets is None else causal_lm_loss(logits, targets)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The family's own initialization (transformers' ``_init_weights`` on every module), from torch's RNG."""
        for module in self.hf.modules():
            self.hf._init_weights(module)
        self.hf.tie_weights()

    def flops_per_token(self) -> float:
        """``6 * N_matmul + 12 * n_layers * attention width * context``, as the native Transformer counts.

        ``N_matmul``: every parameter but the embedding table, plus the head's ``d * V`` when it is tied.
        """
        c = self.text_config
        d = c.hidden_size
        n_matmul = self.num_params(exclude_embeddings=True)
        if self.lm_head is None or self.lm_head.weight is self.tok_emb.weight:
            n_matmul += d * c.vocab_size
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or d // heads
        return float(6 * n_matmul + 12 * c.num_hidden_layers * heads * head_dim * self.cfg.context)

    # ---------------------------------------------------------------- decoding
    @torch.no_grad()
    def kv_shapes(self) -> list[tuple[int, int]]:
        """``(n_kv_heads, head_dim)`` of each layer's cache, read from one token through transformers' own cache.

        Raises ValueError when the family does not keep every layer's keys and values in that cache.
        """
        if self._kv is not None:
            return self._kv
        from transformers.cache_utils import Cache, DynamicLayer

        cache = Cache(layer_class_to_replicate=DynamicLayer)
        idx = torch.zeros(1, 1, dtype=torch.long, device=self._param_like().device)
        try:
            self.hf(input_ids=idx, position_ids=torch.zeros_like(idx), use_cache=True, **{self._cache_arg: cache})
        except (TypeError, ValueError, AttributeError, IndexError, KeyError, NotImplementedError):
            # Its forward takes no such cache, or asks it for another kind of state (convolution, recurrence).
            raise ValueError(f"{type(self.hf).__name__} cannot decode step by step through a key/value cache "
                             f"(its layers keep another kind of state, or none)") from None
        layers = [layer for layer in cache.layers if isinstance(layer, DynamicLayer) and layer.keys is not None]
        n_layers = self.text_config.num_hidden_layers
        if not layers or len(layers) != len(cache.layers) or len(layers) != n_layers:
            raise ValueError(f"{type(self.hf).__name__} keeps {len(layers)} of its {n_layers} layers in a "
                             f"key/value cache: it cannot decode step by step behind lmforge's decode state")
        self._kv = [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in layers]
        return self._kv

    def new_state(self, batch_size: int) -> DecodeState:
        p = self._param_like()
        cap = self.cfg.context
        bufs = [torch.zeros(batch_size, nkv, cap, hd, device=p.device, dtype=p.dtype) for nkv, hd in self.kv_shapes()]
        bufs += [torch.zeros_like(b) for b in bufs]  # keys of every layer, then values
        return DecodeState(tuple(bufs), lens=torch.zeros(batch_size, dtype=torch.long), capacity=cap)

    def _masks(self, q: Tensor, allowed: Tensor, dtype: torch.dtype) -> Tensor | dict[str, Tensor]:
        """The attention mask(s) transformers takes as given: ``(B, 1, T, span)``, one per kind of layer.

        ``allowed`` (B, 1, T, span) bool: the key columns each query may see (causal: at or before the
        query's column ``q`` (B, T); packed: also in the query's own example). On a sliding-window layer a
        column must also be less than ``sliding_window`` behind the query (transformers' rule). Families
        with layers of two kinds take a mapping from kind to mask; the others one mask (all layers sliding
        when the config has a window but no ``layer_types``, as Mistral and Phi-3).
        """
        c = self.text_config
        window = getattr(c, "sliding_window", None)
        kinds = list(dict.fromkeys(getattr(c, "layer_types", None) or []))
        columns = torch.arange(allowed.shape[-1], device=q.device)[None, None, :]  # (1, 1, span)

        def mask(windowed: bool) -> Tensor:
            m = allowed
            if windowed and window:
                m = m & (columns > q[:, :, None] - window)[:, None]  # (B, 1, T, span)
            if self.hf.config._attn_implementation == "sdpa":
                return m
            zero = torch.zeros((), dtype=dtype, device=m.device)  # eager adds the mask to the scores
            return torch.where(m, zero, torch.finfo(dtype).min)

        if len(kinds) > 1:
            return {kind: mask("sliding" in kind) for kind in kinds}
        return mask("sliding" in kinds[0] if kinds else window is not None)

    def step(self, idx: Tensor, state: DecodeState) -> tuple[Tensor, DecodeState]:
        self._check_idx(idx)
        lens = state.check_step(idx)
        b, t = idx.shape
        span = max(lens) + t  # key columns to attend over: the longest row after this step
        positions = (state.lens[:, None] + torch.arange(t)[None, :]).to(idx.device)  # (B, T)
        n = len(state.tensors) // 2
        cache = _row_cache(list(state.tensors[:n]), list(state.tensors[n:]), positions, span)
        columns = torch.arange(span, device=idx.device)[None, None, :]  # (1, 1, span)
        causal = (columns <= positions[:, :, None])[:, None]  # (B, 1, T, span): at or before the query
        masks = self._masks(positions, causal, self._param_like().dtype)
        out = self.hf(input_ids=idx, position_ids=positions, attention_mask=masks, use_cache=True,
                      **{self._cache_arg: cache})
        return out.logits, state.advanced(state.tensors, t)
