"""The GPT-2 layout of lmforge's Transformer, for the Hugging Face export of GPT-2 style models.

A Transformer with ``model.transformer.norm=layernorm pos=learned mlp=gelu bias=true`` and
one key/value head per query head computes what ``GPT2LMHeadModel`` computes; this module
writes its ``config.json`` and renames its weights. GPT-2's ``Conv1D`` layers store
``(in, out)`` matrices, the transpose of ``nn.Linear``'s, and ``c_attn`` holds the query,
key and value projections side by side. Used by :func:`lmforge.export.hf.export_hf`::

    if gpt2_mismatch(cfg) is None:
        config, weights = hf_gpt2_config(cfg, bos, eos, pad), to_hf_gpt2_state_dict(model)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lmforge.config import ModelConfig
from lmforge.models.transformer import Transformer, ffn_hidden_size

GPT2_OPTIONS = {"norm": "layernorm", "pos": "learned", "mlp": "gelu", "bias": True}


def gpt2_mismatch(cfg: ModelConfig) -> str | None:
    """Why ``cfg`` is not a GPT-2 (the first differing field), or None when it is one."""
    if cfg.arch != "transformer":
        return f"model.arch is '{cfg.arch}'"
    t = cfg.transformer
    for key, value in GPT2_OPTIONS.items():
        if getattr(t, key) != value:
            return f"model.transformer.{key} is {getattr(t, key)!r}, GPT-2 has {value!r}"
    if t.n_kv_heads not in (None, t.n_heads):
        return "model.transformer.n_kv_heads differs from n_heads (GPT-2 has no grouped-query attention)"
    if t.qk_norm:
        return "model.transformer.qk_norm is true (GPT-2 has no query/key norm)"
    return None


def hf_gpt2_config(cfg: ModelConfig, bos_token_id: int | None, eos_token_id: int | list[int] | None,
                   pad_token_id: int | None) -> dict:
    """The ``config.json`` of a ``GPT2LMHeadModel`` equal to the Transformer ``cfg`` describes."""
    t = cfg.transformer
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context, "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": t.n_heads,
        "n_inner": ffn_hidden_size(cfg), "activation_function": "gelu_new", "layer_norm_epsilon": t.norm_eps,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": cfg.init_std,
        "scale_attn_weights": True, "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
    }


def to_hf_gpt2_state_dict(model: Transformer) -> dict[str, Tensor]:
    """Our weights under ``GPT2LMHeadModel``'s names and layouts (new tensors; a tied head is left out)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm.weight"], "transformer.ln_f.bias": sd["norm.bias"]}
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(model.cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}ln_1.{kind}"] = sd[f"{ours}attn_norm.{kind}"]
            out[f"{theirs}ln_2.{kind}"] = sd[f"{ours}mlp_norm.{kind}"]
        qkv = [sd[f"{ours}attn.{p}.weight"] for p in "qkv"]
        out[f"{theirs}attn.c_attn.weight"] = torch.cat(qkv, dim=0).t()  # (d, 3d): Conv1D is (in, out)
        out[f"{theirs}attn.c_attn.bias"] = torch.cat([sd[f"{ours}attn.{p}.bias"] for p in "qkv"])
        for hf, mine in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")):
            out[f"{theirs}{hf}.weight"] = sd[f"{ours}{mine}.weight"].t()
            out[f"{theirs}{hf}.bias"] = sd[f"{ours}{mine}.bias"]
    return out
