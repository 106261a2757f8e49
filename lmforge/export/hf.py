"""To and from the Hugging Face format: a folder that ``transformers`` loads with no custom code.

``lmforge export RUN --format hf --out DIR`` writes::

    config.json              LlamaForCausalLM config (models/transformer.py: hf_llama_config)
    generation_config.json   end-of-turn / end-of-text ids, so generate() stops where lmforge does
    model.safetensors        weights under Llama names (a tied lm_head is left out; transformers re-ties it)
    tokenizer.json           the run's tokenizer
    tokenizer_config.json    special tokens and the ChatML chat template
    chat_template.jinja      the same template, where transformers 5 looks for it
    special_tokens_map.json

then loads the folder back with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and
checks that its logits equal lmforge's within 1e-4 and that both tokenizers give
the same ids (``export.check``). Only the Transformer without ``qk_norm`` maps
onto Llama; other models are refused with a pointer to ``--format lmforge``.
:func:`load_hf` reads such a folder back into lmforge (``lmforge serve DIR``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.config import ConfigError, ModelConfig, RunConfig
from lmforge.data.tokenizer import EOT, PAD, Tokenizer
from lmforge.models import build_model
from lmforge.models.transformer import Transformer, hf_llama_config, to_hf_llama_state_dict
from lmforge.serve.chat import CHAT_TEMPLATE, IM_END, IM_START
from lmforge.train.checkpoint import CheckpointError
from lmforge.trained import TrainedModel

LOGITS_TOLERANCE = 1e-4
CHECK_TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer"


def require_llama(tm: TrainedModel, fmt: str) -> Transformer:
    """The model as a Llama-compatible Transformer, or a ConfigError saying what to do instead."""
    cfg = tm.cfg.model
    if cfg.arch != "transformer":
        raise ConfigError(f"export.format={fmt} is for the Transformer (a Llama-compatible model); this run's "
                          f"model.arch is '{cfg.arch}'. Use --format lmforge, which lmforge loads back for every "
                          f"architecture")
    if cfg.transformer.qk_norm:
        raise ConfigError(f"export.format={fmt}: model.transformer.qk_norm is true, which Llama has no place for; "
                          f"use --format lmforge")
    assert isinstance(tm.model, Transformer)
    return tm.model


def special_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    return {"eot": tokenizer.eot_id, "pad": tokenizer.token_to_id(PAD), "im_start": tokenizer.token_to_id(IM_START),
            "im_end": tokenizer.token_to_id(IM_END)}


def export_hf(tm: TrainedModel, out: Path) -> list[Path]:
    """Write the Hugging Face folder ``out``; returns the files written."""
    model = require_llama(tm, "hf")
    out.mkdir(parents=True, exist_ok=True)
    ids = special_ids(tm.tokenizer)
    stops = sorted({i for i in (ids["eot"], ids["im_end"]) if i is not None})
    config = hf_llama_config(model.cfg, bos_token_id=ids["eot"], eos_token_id=stops, pad_token_id=ids["pad"])
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    files = {
        "config.json": config,
        "generation_config.json": {"bos_token_id": ids["eot"], "eos_token_id": stops, "pad_token_id": ids["pad"],
                                   "do_sample": False},
        "special_tokens_map.json": {"bos_token": EOT, "eos_token": EOT, "pad_token": PAD},
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "pad_token": PAD,
            "unk_token": None, "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": model.cfg.context,
            "chat_template": CHAT_TEMPLATE},
    }
    written = []
    for name, body in files.items():
        (out / name).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
        written.append(out / name)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    # Cloned and contiguous: safetensors refuses tensors that share memory or are views.
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in to_hf_llama_state_dict(model).items()}
    tmp = out / "model.safetensors.tmp"
    save_file(weights, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    written += [out / "chat_template.jinja", out / "model.safetensors", tm.tokenizer.save(out)]
    return written


def check_hf(tm: TrainedModel, out: Path, tolerance: float = LOGITS_TOLERANCE) -> dict:
    """Load ``out`` with transformers and compare logits and tokenization with lmforge's; raise if they differ."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    ours_ids = tm.tokenizer.encode(CHECK_TEXT)
    theirs_ids = hf_tok(CHECK_TEXT, add_special_tokens=False)["input_ids"]
    if ours_ids != theirs_ids:
        raise CheckpointError(f"{out}: transformers tokenizes the check text differently from lmforge")
    context = tm.cfg.model.context
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, tm.cfg.model.vocab_size, (2, min(context, 64)), generator=g)
    idx[0, : min(len(ours_ids), idx.shape[1])] = torch.tensor(ours_ids[: idx.shape[1]])
    model = tm.model.float().cpu().eval()
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(input_ids=idx).logits
    diff = float((ours - theirs).abs().max())
    if diff > tolerance:
        raise CheckpointError(f"{out}: transformers' logits differ from lmforge's by {diff:.2e} (> {tolerance:.0e})")
    return {"max_logit_diff": diff, "checked_tokens": int(idx.numel())}


_HF_TO_OURS = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn.q.weight",
    "self_attn.k_proj.weight": "attn.k.weight", "self_attn.v_proj.weight": "attn.v.weight",
    "self_attn.o_proj.weight": "attn.o.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate.weight", "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}


def _model_config(hf: dict, where: Path) -> ModelConfig:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise CheckpointError(f"{where}: {what}, which lmforge's Transformer cannot load")

    need(hf.get("model_type") == "llama", f"model_type is {hf.get('model_type')!r}, not 'llama'")
    need(hf.get("hidden_act", "silu") == "silu", f"hidden_act is {hf.get('hidden_act')!r}")
    need(not hf.get("attention_bias") and not hf.get("mlp_bias"), "the model has biases")
    heads, d = hf["num_attention_heads"], hf["hidden_size"]
    need(hf.get("head_dim", d // heads) == d // heads, "head_dim differs from hidden_size / heads")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    need(rope.get("rope_type", rope.get("type", "default")) == "default", "it uses scaled rotary positions")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kv = hf.get("num_key_value_heads", heads)
    return ModelConfig(arch="transformer", vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"],
                       context=hf.get("max_position_embeddings", 2048),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                       transformer={"n_heads": heads, "n_kv_heads": None if kv == heads else kv,
                                    "ffn_hidden": hf["intermediate_size"], "rope_theta": float(theta),
                                    "norm_eps": hf.get("rms_norm_eps", 1e-5)})


def load_hf(folder: Path, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a Hugging Face Llama folder (one :func:`export_hf` wrote, or any plain Llama) into lmforge."""
    folder = Path(folder)
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", folder.resolve().name) or "model"
    cfg = RunConfig(name=name, model=_model_config(hf, folder))
    model = build_model(cfg.model)
    ours: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(str(folder / "model.safetensors")).items():
        if key == "model.embed_tokens.weight":
            ours["tok_emb.weight"] = tensor
        elif key == "model.norm.weight":
            ours["norm.weight"] = tensor
        elif key == "lm_head.weight":
            ours["lm_head.weight"] = tensor
        elif (m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)) and m.group(2) in _HF_TO_OURS:
            ours[f"layers.{m.group(1)}.{_HF_TO_OURS[m.group(2)]}"] = tensor
        else:
            raise CheckpointError(f"{folder / 'model.safetensors'}: tensor '{key}' has no lmforge counterpart")
    if cfg.model.tie_embeddings:
        ours.pop("lm_head.weight", None)
        ours["lm_head.weight"] = ours["tok_emb.weight"]
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: the weights do not fit the config ({str(e).splitlines()[0]})") from None
    model.to(device).eval()
    return TrainedModel(model=model, tokenizer=Tokenizer.load(folder), cfg=cfg, path=folder, step=0)
