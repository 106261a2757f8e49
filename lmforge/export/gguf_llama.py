"""What the GGUF writer writes for a model of the Llama family: hyperparameters, tensors and tokens.

Two kinds of model become a ``llama`` architecture GGUF (:func:`llama_spec`):

- lmforge's Transformer with Llama's options (renamed by :mod:`lmforge.export.hf_llama`), with
  lmforge's ChatML template and end tokens;
- a wrapped Hugging Face model (``model.arch=hf``) whose ``model_type`` is ``llama`` (Llama 2,
  Llama 3.x, SmolLM, TinyLlama, ...): its own tensors, its tokenizer's end tokens and chat template,
  and Llama 3's scaled rotary positions as llama.cpp stores them, a ``rope_freqs`` tensor holding the
  divisor of each rotary frequency (:func:`llama3_rope_factors`).

Any other family is refused with a ConfigError that names it: llama.cpp's own converter
(``convert_hf_to_gguf.py``) takes the ``--format hf`` folder of those. Example::

    spec = llama_spec(tm)          # spec.tensors: Hugging Face Llama names -> tensors
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from lmforge.config import ConfigError
from lmforge.data.chat import CHAT_TEMPLATE, IM_END
from lmforge.export.hf_llama import to_hf_llama_state_dict
from lmforge.models import HFCausalLM
from lmforge.trained import TrainedModel

# The pre-tokenizer regex of Llama 3's tokenizer.json; llama.cpp calls that split "llama-bpe".
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class LlamaSpec:
    context: int
    d_model: int
    n_layers: int
    ffn: int
    n_heads: int
    n_kv: int
    rope_theta: float
    norm_eps: float
    tensors: dict[str, Tensor]  # Hugging Face Llama names; a tied lm_head left out
    bos: int
    eos: int
    eot: int
    chat_template: str | None
    pre_tokenizer: str = "gpt-2"  # llama.cpp's name of the split before byte-level BPE
    rope_factors: np.ndarray | None = None  # (head_dim / 2,) divisors of the rotary frequencies


def llama3_rope_factors(rope: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """How much Llama 3's rope scaling slows each rotary frequency (llama.cpp divides by these).

    Wavelengths shorter than ``original / high_freq_factor`` keep their frequency (1), longer than
    ``original / low_freq_factor`` are slowed by ``factor``, and those between are blended linearly in
    ``original / wavelength``: the frequency becomes ``f * ((1 - s) / factor + s)``.
    """
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            s = (original / wavelength - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.asarray(out, dtype=np.float32)


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for a byte-level tokenizer's split: GPT-2's regex or Llama 3's; None for another."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT \
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True):
        return "llama-bpe"
    return None


def llama_spec(tm: TrainedModel) -> LlamaSpec:
    """The GGUF contents of ``tm``, or a ConfigError saying why it is not a Llama that lmforge writes."""
    if isinstance(tm.model, HFCausalLM):
        return _wrapped_spec(tm, tm.model)
    from lmforge.export.hf import require_llama, special_ids

    model = require_llama(tm, "gguf")
    cfg, t = model.cfg, model.cfg.transformer
    ids = special_ids(tm.tokenizer)
    return LlamaSpec(context=cfg.context, d_model=cfg.d_model, n_layers=cfg.n_layers,
                     ffn=model.layers[0].mlp.gate.out_features, n_heads=t.n_heads, n_kv=t.n_kv_heads or t.n_heads,
                     rope_theta=t.rope_theta, norm_eps=t.norm_eps, tensors=to_hf_llama_state_dict(model),
                     bos=ids["bos"], eos=ids["im_end"] if ids["im_end"] is not None else ids["eot"], eot=ids["eot"],
                     chat_template=tm.tokenizer.chat_template or CHAT_TEMPLATE)  # an imported model keeps its own


def _wrapped_spec(tm: TrainedModel, model: HFCausalLM) -> LlamaSpec:
    c = model.text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    why = None
    if c.model_type != "llama":
        why = f"its model_type is {c.model_type!r}; lmforge writes GGUF for the Llama family (model_type 'llama')"
    elif getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False) or c.hidden_act != "silu":
        why = "it has biases or a non-SiLU MLP, which the llama GGUF architecture has no place for"
    elif head_dim != c.hidden_size // c.num_attention_heads:
        why = f"its head_dim ({head_dim}) is not hidden_size / num_attention_heads"
    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if why is None and kind not in ("default", "llama3"):
        why = f"its rotary positions are scaled as {kind!r} (lmforge writes plain and llama3 scaling)"
    tok = tm.tokenizer
    pre = pre_tokenizer_name(json.loads(tok.inner.to_str()))
    if why is None and pre is None:
        why = "its tokenizer splits text neither as GPT-2 nor as Llama 3 does"
    if why:
        raise ConfigError(f"export.format=gguf cannot write {tm.path}: {why}. Use --format hf (llama.cpp's "
                          f"convert_hf_to_gguf.py converts that folder) or --format lmforge")
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
    tensors = {k: v for k, v in model.hf.state_dict().items()
               if not (k == "lm_head.weight" and tm.cfg.model.tie_embeddings)}
    ends = [i for i in tok.end_ids if i != tok.eot_id and i != tok.token_to_id(IM_END)]
    return LlamaSpec(context=tm.cfg.model.context, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
                     ffn=c.intermediate_size, n_heads=c.num_attention_heads,
                     n_kv=c.num_key_value_heads or c.num_attention_heads, rope_theta=theta,
                     norm_eps=c.rms_norm_eps, tensors=tensors, bos=tok.bos_id, eos=tok.eot_id,
                     eot=ends[0] if ends else tok.eot_id, chat_template=getattr(tok, "chat_template", None),
                     pre_tokenizer=pre or "gpt-2",
                     rope_factors=llama3_rope_factors(rope, theta, head_dim) if kind == "llama3" else None)
