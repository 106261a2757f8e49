"""A Hugging Face ``config.json`` -> the lmforge :class:`~lmforge.config.ModelConfig` of the same model.

Two families map onto lmforge's Transformer with no change in what it computes:

- Llama (``model_type`` ``llama``, and ``mistral`` whose only difference, a sliding
  attention window, is exact when ``model.context`` is no longer than the window):
  RMSNorm, rotary positions, SwiGLU, grouped-query attention, biases on all linears or none;
- GPT-2 (``gpt2``): LayerNorm, learned positions, tanh-GELU MLP, biases
  (``model.transformer.norm=layernorm pos=learned mlp=gelu bias=true``).

:func:`model_config` refuses anything else (other model types, scaled rotary positions, other
activations, partial biases) with a :class:`~lmforge.train.checkpoint.CheckpointError` naming
the file and the field, rather than build a Transformer that would compute something else;
:func:`native_config` turns that refusal into None. Every other causal LM that transformers
knows gets :func:`wrapped_config`: ``model.arch=hf``, the family's own code behind lmforge's
contract (:mod:`lmforge.models.hf_causal`). Encoder-only and encoder-decoder models are
refused there, with the reason::

    cfg = native_config(hf, path) or wrapped_config(hf, path)   # hf: config.json as a dict
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from lmforge.config import ConfigError, ModelConfig
from lmforge.models.hf_causal import hf_config_object
from lmforge.train.checkpoint import CheckpointError

LLAMA_TYPES = ("llama", "mistral")
# Activations computed as torch's tanh-approximated GELU (GPT-2 ships "gelu_new").
GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh")
WHY_NOT = {
    "qwen2": "it has biases on the query, key and value projections only, which lmforge's Transformer "
             "(biases on every linear or none) does not represent",
}
# A wrapped model's decode state is preallocated for model.context tokens per row (its KV cache), so a
# family's 128k positions are not all reserved; --model.context raises it up to the family's own limit.
WRAPPED_CONTEXT = 4096


def native_config(hf: dict[str, Any], where: Path) -> ModelConfig | None:
    """lmforge's Transformer config when it computes exactly this model (it is faster), else None."""
    if hf.get("model_type") not in (*LLAMA_TYPES, "gpt2"):
        return None
    try:
        return model_config(hf, where)
    except CheckpointError:
        return None  # a Llama variant the Transformer does not express (scaled rotary, head_dim, ...)


def wrapped_config(hf: dict[str, Any], where: Path) -> ModelConfig:
    """``model.arch=hf`` for a decoder-only causal LM transformers knows; CheckpointError naming the reason if not."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = hf.get("model_type")
    try:
        config = hf_config_object(hf)
    except ConfigError:
        raise CheckpointError(f"{where}: model_type {model_type!r} is not a model family transformers knows") from None
    except Exception as e:  # a config class rejects bad values with its own exception types
        raise CheckpointError(f"{where}: transformers rejects this config ({str(e).splitlines()[0]})") from None
    if getattr(config, "is_encoder_decoder", False):
        raise CheckpointError(f"{where}: model_type {model_type!r} is an encoder-decoder (sequence-to-sequence) "
                              f"model; lmforge loads decoder-only causal language models")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise CheckpointError(f"{where}: model_type {model_type!r} is an encoder-only (masked language) model; "
                              f"lmforge loads decoder-only causal language models")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CheckpointError(f"{where}: model_type {model_type!r} has no causal language model in transformers "
                              f"(AutoModelForCausalLM does not load it)")
    text = config.get_text_config()
    longest = getattr(text, "max_position_embeddings", None) or WRAPPED_CONTEXT
    try:
        return ModelConfig(arch="hf", vocab_size=text.vocab_size, d_model=text.hidden_size,
                           n_layers=text.num_hidden_layers, context=min(longest, WRAPPED_CONTEXT),
                           tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                           init_std=getattr(text, "initializer_range", 0.02), hf_config=hf)
    except (ValidationError, AttributeError) as e:
        why = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
        raise CheckpointError(f"{where}: lmforge cannot read the model's size from it ({why})") from None


def model_config(hf: dict[str, Any], where: Path) -> ModelConfig:
    """The ModelConfig for the Hugging Face config ``hf`` read from ``where`` (named in errors)."""
    model_type = hf.get("model_type")
    if model_type in LLAMA_TYPES:
        fields = _llama(hf, where)
    elif model_type == "gpt2":
        fields = _gpt2(hf, where)
    else:
        why = WHY_NOT.get(str(model_type), "lmforge imports Llama-family (llama, mistral) and GPT-2 causal LMs")
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported: {why}")
    try:
        return ModelConfig(arch="transformer", **fields)
    except ValidationError as e:
        first = e.errors()[0]
        raise CheckpointError(f"{where}: the model does not fit lmforge's Transformer "
                              f"({'.'.join(map(str, first['loc']))}: {first['msg']})") from None


def _field(hf: dict[str, Any], key: str, where: Path) -> Any:
    if hf.get(key) is None:
        raise CheckpointError(f"{where}: field '{key}' is missing")
    return hf[key]


def _refuse(where: Path, key: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"{where}: field '{key}' is {value!r}: {why}, which lmforge's Transformer cannot load")


def _llama(hf: dict[str, Any], where: Path) -> dict[str, Any]:
    d, heads = _field(hf, "hidden_size", where), _field(hf, "num_attention_heads", where)
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(where, "hidden_act", hf["hidden_act"], "the MLP activation is not SiLU")
    bias = bool(hf.get("attention_bias", False))
    if bool(hf.get("mlp_bias", False)) != bias:
        raise _refuse(where, "mlp_bias", hf.get("mlp_bias"), f"it differs from attention_bias ({bias})")
    if hf.get("head_dim") not in (None, d // heads):
        raise _refuse(where, "head_dim", hf["head_dim"], f"it is not hidden_size / num_attention_heads ({d // heads})")
    # transformers 4 writes rope_theta (+ rope_scaling); transformers 5 writes rope_parameters.
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key) or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise _refuse(where, key, rope, f"it scales rotary positions ({kind})")
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    context = hf.get("max_position_embeddings", 2048)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window is not None:
        context = min(context, window)  # attention within the window is all of it: exact
    kv = hf.get("num_key_value_heads") or heads
    return {
        "vocab_size": _field(hf, "vocab_size", where), "d_model": d, "n_layers": _field(hf, "num_hidden_layers", where),
        "context": context, "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "init_std": hf.get("initializer_range", 0.02),
        "transformer": {"n_heads": heads, "n_kv_heads": None if kv == heads else kv,
                        "ffn_hidden": _field(hf, "intermediate_size", where), "rope_theta": float(theta),
                        "norm_eps": hf.get("rms_norm_eps", 1e-6), "bias": bias},
    }


def _gpt2(hf: dict[str, Any], where: Path) -> dict[str, Any]:
    act = hf.get("activation_function", "gelu_new")
    if act not in GPT2_GELUS:
        raise _refuse(where, "activation_function", act, f"it is not one of {', '.join(GPT2_GELUS)}")
    if not hf.get("scale_attn_weights", True):
        raise _refuse(where, "scale_attn_weights", False, "attention is not scaled by 1/sqrt(head_dim)")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(key):
            raise _refuse(where, key, hf[key], "it changes the attention")
    d = _field(hf, "n_embd", where)
    return {
        "vocab_size": _field(hf, "vocab_size", where), "d_model": d, "n_layers": _field(hf, "n_layer", where),
        "context": hf.get("n_positions") or _field(hf, "n_ctx", where),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "init_std": hf.get("initializer_range", 0.02),
        "transformer": {"n_heads": _field(hf, "n_head", where), "ffn_hidden": hf.get("n_inner") or 4 * d,
                        "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "norm": "layernorm", "pos": "learned",
                        "mlp": "gelu", "bias": True},
    }
