"""A Transformer's LoRA adapters in PEFT's format, for ``peft``, ``transformers`` and vLLM (``--lora-modules``).

Every LoRA fine-tune of lmforge's Transformer writes, next to lmforge's own ``adapter.safetensors`` /
``adapter.json`` (which every architecture has), the two files PEFT reads::

    adapter_config.json          peft_type LORA, r, lora_alpha, target_modules (Hugging Face module names)
    adapter_model.safetensors    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight, ...

They apply to the model as :mod:`lmforge.export.hf` writes it (Llama layout): ``layers.N.attn.q`` is
``model.layers.N.self_attn.q_proj`` there (:func:`lmforge.export.hf_llama.hf_llama_module`). The numbers
carry over unchanged: lmforge and PEFT both add ``(alpha / r) * B @ A`` (plain LoRA scaling, no rsLoRA),
with ``A`` of shape ``(r, in)`` and ``B`` ``(out, r)``, and lmforge's projections are separate, as Llama's
are. Loading them back::

    base = AutoModelForCausalLM.from_pretrained("exported/base-hf")
    tuned = PeftModel.from_pretrained(base, "runs/x/finetune/adapter")    # = lmforge's merged model
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lmforge.artifacts import write_text
from lmforge.config import LoraConfig
from lmforge.export.hf_llama import hf_llama_module
from lmforge.train.checkpoint import write_safetensors
from lmforge.train.lora import adapter_state

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's name for the wrapped model, before the model's own module names


def save_peft_adapter(model: nn.Module, folder: Path, cfg: LoraConfig, targets: list[str], base: str) -> list[Path]:
    """Write the adapters attached to ``model`` (a Llama-layout Transformer, not merged) in PEFT's format.

    ``base`` is written as ``base_model_name_or_path`` (the folder or name of the model they apply to).
    Raises ConfigError for a Transformer that has no Llama layout (its Hugging Face export is not Llama).
    """
    modules = {t: hf_llama_module(t, model.cfg) for t in targets}
    tensors = {}
    for name, t in adapter_state(model).items():
        module, _, which = name.rpartition(".")  # layers.0.attn.q, lora_A
        tensors[f"{PREFIX}{modules[module]}.{which}.weight"] = t
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": False,
        "target_modules": sorted(modules.values()), "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    write_text(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return [folder / CONFIG_FILE, folder / WEIGHTS_FILE]
