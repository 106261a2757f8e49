"""The Llama layout of lmforge's Transformer, for the Hugging Face export and the GGUF writer.

With ``model.transformer.qk_norm`` off and Llama's norm, positions and MLP (the defaults),
lmforge's Transformer computes what ``LlamaForCausalLM`` computes; this module writes its
``config.json`` and renames its weights. Used by :func:`lmforge.export.hf.export_hf` and
:mod:`lmforge.export.gguf`::

    config, weights = hf_llama_config(cfg, bos, eos, pad), to_hf_llama_state_dict(model)
"""

from __future__ import annotations

from torch import Tensor

from lmforge.config import ConfigError, ModelConfig
from lmforge.models.transformer import Transformer, ffn_hidden_size


def _check_llama_compatible(cfg: ModelConfig) -> None:
    if cfg.arch != "transformer":
        raise ConfigError(f"model.arch is '{cfg.arch}': only the transformer maps onto Llama")
    if cfg.transformer.qk_norm:
        raise ConfigError("model.transformer.qk_norm is true: Llama has no query/key norm, so it cannot be exported")
    t = cfg.transformer
    for key, llama in (("norm", "rmsnorm"), ("pos", "rope"), ("mlp", "swiglu")):
        if getattr(t, key) != llama:
            raise ConfigError(f"model.transformer.{key} is '{getattr(t, key)}': Llama has only {key}={llama}")


def hf_llama_config(
    cfg: ModelConfig,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """The ``config.json`` of a Hugging Face ``LlamaForCausalLM`` equal to our Transformer.

    The rotary base is written both as ``rope_theta`` (transformers 4.x) and as
    ``rope_parameters`` (transformers 5.x), so either version loads it.
    """
    _check_llama_compatible(cfg)
    t = cfg.transformer
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": ffn_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": t.n_heads,
        "num_key_value_heads": t.n_kv_heads or t.n_heads,
        "head_dim": cfg.d_model // t.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context,
        "rms_norm_eps": t.norm_eps,
        "rope_theta": t.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": t.bias,
        "attention_dropout": 0.0,
        "mlp_bias": t.bias,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }


_HF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}


def hf_llama_module(name: str, cfg: ModelConfig) -> str:
    """The Hugging Face Llama name of one of our modules (``layers.0.attn.q`` -> ``model.layers.0.self_attn.q_proj``).

    Raises ConfigError for a model without the Llama layout, ValueError for a module Llama has not.
    """
    _check_llama_compatible(cfg)
    _, index, stem = name.split(".", 2) if name.startswith("layers.") else ("", "", "")
    hf_name = _HF_LAYER_NAMES.get(f"{stem}.weight")
    if hf_name is None:
        raise ValueError(f"module '{name}' has no Llama counterpart")
    return f"model.layers.{index}.{hf_name.removesuffix('.weight')}"


def to_hf_llama_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our weights under Hugging Face Llama names (detached; they share memory with the model).

    With tied embeddings ``lm_head.weight`` is left out, as ``save_pretrained``
    does: transformers re-ties it from ``model.embed_tokens.weight`` on load.
    """
    _check_llama_compatible(model.cfg)
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name == "tok_emb.weight":
            out["model.embed_tokens.weight"] = tensor.detach()
        elif name == "norm.weight":
            out["model.norm.weight"] = tensor.detach()
        elif name == "lm_head.weight":
            if not model.cfg.tie_embeddings:
                out["lm_head.weight"] = tensor.detach()
        elif name.startswith("layers."):
            _, index, rest = name.split(".", 2)
            stem, _, kind = rest.rpartition(".")  # kind: weight or bias (model.transformer.bias)
            hf_name = _HF_LAYER_NAMES.get(f"{stem}.weight")
            if hf_name is None or (kind == "bias" and stem.endswith("norm")):
                raise ValueError(f"parameter '{name}' has no Llama counterpart")
            out[f"model.layers.{index}.{hf_name.rpartition('.')[0]}.{kind}"] = tensor.detach()
        else:
            raise ValueError(f"parameter '{name}' has no Llama counterpart")
    return out
