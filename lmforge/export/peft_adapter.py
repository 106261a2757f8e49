"""A Transformer's LoRA adapters in PEFT's format, for ``peft``, ``transformers`` and vLLM (``--lora-modules``).

Every LoRA fine-tune of lmforge's Transformer writes, next to lmforge's own ``adapter.safetensors`` /
``adapter.json`` (which every architecture has), the two files PEFT reads::

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules (Hugging Face module names)
    adapter_model.safetensors    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ...

They apply to the model as :mod:`lmforge.export.hf` writes it. In the Llama layout ``layers.N.attn.q``
is ``model.layers.N.self_attn.q_proj`` (:func:`lmforge.export.hf_llama.hf_llama_module`) and the numbers
carry over unchanged: lmforge and PEFT both add ``(alpha / r) * B @ A`` (plain LoRA scaling, no rsLoRA),
with ``A`` of shape ``(r, in)`` and ``B`` ``(out, r)``, and the projections are separate on both sides.
GPT-2 holds the query, key and value projections in one ``c_attn``: their adapters become one adapter
of rank ``3r`` on it (``A`` stacked, ``B`` block-diagonal, zeros for a projection not adapted, alpha
``3 alpha`` so the scale stays ``alpha / r``), which adds exactly the same ``B @ A`` to each part; its
``Conv1D`` layers are marked ``fan_in_fan_out``. Loading them back::

    base = AutoModelForCausalLM.from_pretrained("exported/base-hf")
    tuned = PeftModel.from_pretrained(base, "runs/x/finetune/adapter")    # = lmforge's merged model
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from lmforge.artifacts import write_text
from lmforge.config import LoraConfig
from lmforge.export.hf_gpt2 import gpt2_mismatch
from lmforge.export.hf_llama import hf_llama_module
from lmforge.train.lora import adapter_state
from lmforge.train.weights import write_safetensors

_GPT2_MODULES = {"attn.o": "attn.c_proj", "mlp.up": "mlp.c_fc", "mlp.down": "mlp.c_proj"}

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's name for the wrapped model, before the model's own module names


def save_peft_adapter(model: nn.Module, folder: Path, cfg: LoraConfig, targets: list[str], base: str) -> list[Path]:
    """Write the adapters attached to ``model`` (a Llama-layout Transformer, not merged) in PEFT's format.

    ``base`` is written as ``base_model_name_or_path`` (the folder or name of the model they apply to).
    Raises ConfigError for a Transformer whose Hugging Face export is neither Llama nor GPT-2.
    """
    state = adapter_state(model)
    gpt2 = gpt2_mismatch(model.cfg) is None
    tensors, patterns = _gpt2_tensors(state, cfg) if gpt2 else _llama_tensors(state, model.cfg)
    modules = sorted({n.removeprefix(PREFIX).rsplit(".", 2)[0] for n in tensors})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": False,
        "target_modules": modules, "bias": "none", "fan_in_fan_out": gpt2, **patterns,
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return [folder / CONFIG_FILE, folder / WEIGHTS_FILE]


def _llama_tensors(state: dict[str, Tensor], cfg) -> tuple[dict[str, Tensor], dict]:
    out = {}
    for name, t in state.items():
        module, _, which = name.rpartition(".")  # layers.0.attn.q, lora_A
        out[f"{PREFIX}{hf_llama_module(module, cfg)}.{which}.weight"] = t
    return out, {}


def _gpt2_tensors(state: dict[str, Tensor], cfg: LoraConfig) -> tuple[dict[str, Tensor], dict]:
    """GPT-2 names; q, k and v adapters of a layer joined into one rank-3r adapter on its ``c_attn``."""
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[str, tuple[Tensor, Tensor]]] = {}  # layer -> part -> (A, B)
    for name in state:
        module, _, which = name.rpartition(".")
        if which != "lora_A":
            continue
        _, layer, stem = module.split(".", 2)  # layers, 0, attn.q
        a, b = state[name], state[f"{module}.lora_B"]
        if stem in ("attn.q", "attn.k", "attn.v"):
            fused.setdefault(layer, {})[stem[-1]] = (a, b)
        else:
            hf = f"{PREFIX}transformer.h.{layer}.{_GPT2_MODULES[stem]}"
            out[f"{hf}.lora_A.weight"], out[f"{hf}.lora_B.weight"] = a, b
    ranks, alphas = {}, {}
    for layer, parts in fused.items():
        a0, b0 = next(iter(parts.values()))
        width, rank, d_in = b0.shape[0], a0.shape[0], a0.shape[1]
        a_rows, b_blocks = [], torch.zeros(3 * width, 3 * rank, dtype=a0.dtype)
        for i, p in enumerate("qkv"):
            a, b = parts.get(p, (torch.zeros(rank, d_in, dtype=a0.dtype), torch.zeros(width, rank, dtype=a0.dtype)))
            a_rows.append(a)
            b_blocks[i * width:(i + 1) * width, i * rank:(i + 1) * rank] = b
        module = f"transformer.h.{layer}.attn.c_attn"
        out[f"{PREFIX}{module}.lora_A.weight"] = torch.cat(a_rows)  # (3r, in)
        out[f"{PREFIX}{module}.lora_B.weight"] = b_blocks  # (3 out, 3r)
        ranks[module], alphas[module] = 3 * cfg.rank, 3 * cfg.alpha
    return out, {"rank_pattern": ranks, "alpha_pattern": alphas}
