"""To and from the Hugging Face format: a folder that ``transformers`` loads with no custom code.

``lmforge export RUN --format hf --out DIR`` writes::

    config.json              LlamaForCausalLM config (export/hf_llama.py: hf_llama_config), or
                             GPT2LMHeadModel for a GPT-2 style Transformer (export/hf_gpt2.py)
    generation_config.json   every end token (end of turn, end of text), so generate() stops where lmforge
                             does, and max_length = the model's context
    model.safetensors        weights under Llama / GPT-2 names (a tied lm_head is left out; transformers re-ties it)
    tokenizer.json           the run's tokenizer
    tokenizer_config.json    special tokens and the ChatML chat template (when the tokenizer has its tokens)
    chat_template.jinja      the same template, where transformers 5 looks for it
    special_tokens_map.json

then loads the folder back with ``AutoModelForCausalLM`` / ``AutoTokenizer`` and
checks that its logits equal lmforge's within 1e-4 and that both tokenizers give
the same ids (``export.check``). Only the Transformer maps onto Llama (default options,
no ``qk_norm``) or GPT-2 (``norm=layernorm pos=learned mlp=gelu bias=true``); other models
are refused with a pointer to ``--format lmforge``. A wrapped model (``model.arch=hf``, opened from a
Hugging Face folder of another family) is written back as its own family by transformers
(:mod:`lmforge.export.hf_wrapped`) and checked the same way. :mod:`lmforge.trained.hf`
reads such a folder back into lmforge (``lmforge serve DIR``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.artifacts import atomic_path, write_text
from lmforge.config import ConfigError
from lmforge.data.chat import CHAT_TEMPLATE, IM_END, IM_START
from lmforge.data.tokenizer import Tokenizer
from lmforge.export.hf_gpt2 import gpt2_mismatch, hf_gpt2_config, to_hf_gpt2_state_dict
from lmforge.export.hf_llama import hf_llama_config, to_hf_llama_state_dict
from lmforge.models.transformer import Transformer
from lmforge.train.weights import CheckpointError, write_safetensors
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
    t = cfg.transformer
    for key, llama in (("qk_norm", False), ("norm", "rmsnorm"), ("pos", "rope"), ("mlp", "swiglu")):
        if getattr(t, key) != llama:
            hint = "; --format hf writes GPT-2 style models as GPT-2" if fmt != "hf" else ""
            raise ConfigError(f"export.format={fmt}: model.transformer.{key} is {getattr(t, key)!r}, which Llama "
                              f"has no place for (it has {key}={llama}); use --format lmforge{hint}")
    if fmt == "gguf" and t.bias:
        raise ConfigError("export.format=gguf: model.transformer.bias is true; the GGUF export writes Llama "
                          "without biases. Use --format hf or --format lmforge")
    assert isinstance(tm.model, Transformer)
    return tm.model


def hf_layout(tm: TrainedModel) -> tuple[Transformer, str]:
    """The model and the Hugging Face architecture it is written as: 'gpt2' or 'llama' (else ConfigError)."""
    why_not_gpt2 = gpt2_mismatch(tm.cfg.model)
    if why_not_gpt2 is None:
        assert isinstance(tm.model, Transformer)
        return tm.model, "gpt2"
    if tm.cfg.model.arch != "transformer":
        return require_llama(tm, "hf"), "llama"  # raises, pointing to --format lmforge
    try:
        return require_llama(tm, "hf"), "llama"
    except ConfigError as e:
        raise ConfigError(f"{e}. Nor is it a GPT-2: {why_not_gpt2}") from None


def special_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    return {"eot": tokenizer.eot_id, "bos": tokenizer.bos_id, "pad": tokenizer.pad_id,
            "im_start": tokenizer.token_to_id(IM_START), "im_end": tokenizer.token_to_id(IM_END)}


def export_hf(tm: TrainedModel, out: Path) -> list[Path]:
    """Write the Hugging Face folder ``out``; returns the files written."""
    if tm.cfg.model.arch == "hf":
        from lmforge.export.hf_wrapped import export_wrapped

        return export_wrapped(tm, out)
    model, layout = hf_layout(tm)
    out.mkdir(parents=True, exist_ok=True)
    # First: the files below replace its special_tokens_map.json. The post-processor puts the begin
    # token first as lmforge scores (Tokenizer.add_bos), so transformers and lm-eval see the same ids.
    written = [tm.tokenizer.save(out, bos_post_processor=True)]
    ids = special_ids(tm.tokenizer)
    stops = tm.tokenizer.end_ids  # every end token (end of text, end of turn): generate() stops at each
    make_config = hf_gpt2_config if layout == "gpt2" else hf_llama_config
    config = make_config(model.cfg, bos_token_id=ids["bos"], eos_token_id=stops, pad_token_id=ids["pad"])
    config["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    # The tokenizer's own special tokens: lmforge's, or those of the model it was imported with.
    names = {k: v for k, v in tm.tokenizer.specials.items() if v is not None}
    # An imported model keeps its own template. The ChatML template needs its two tokens; a tokenizer
    # imported without them and without a template of its own gets none.
    own = tm.tokenizer.chat_template
    chat = own is not None or (ids["im_start"] is not None and ids["im_end"] is not None)
    # transformers' apply_chat_template tokenizes without special tokens, so the begin token lmforge puts
    # before a conversation (Tokenizer.with_bos) is written by the template; llama.cpp adds it itself.
    template = own if own is not None else ("{{- bos_token }}" if tm.tokenizer.add_bos else "") + CHAT_TEMPLATE
    files = {
        "config.json": config,
        # max_length: without it, pipeline("text-generation") runs past the context (transformers only warns).
        "generation_config.json": {"bos_token_id": ids["bos"], "eos_token_id": stops, "pad_token_id": ids["pad"],
                                   "max_length": model.cfg.context, "do_sample": False},
        "special_tokens_map.json": names,
        "tokenizer_config.json": {
            "tokenizer_class": "PreTrainedTokenizerFast", **names,
            "unk_token": None, "add_bos_token": tm.tokenizer.add_bos, "add_eos_token": False,
            "clean_up_tokenization_spaces": False, "model_max_length": model.cfg.context,
            **({"chat_template": template} if chat else {})},
    }
    for name, body in files.items():
        write_text(out / name, json.dumps(body, indent=2) + "\n")
        written.append(out / name)
    if chat:
        write_text(out / "chat_template.jinja", template)
        written.append(out / "chat_template.jinja")
    hf_weights = to_hf_gpt2_state_dict(model) if layout == "gpt2" else to_hf_llama_state_dict(model)
    with atomic_path(out / "model.safetensors") as tmp:
        write_safetensors(hf_weights, tmp, metadata={"format": "pt"})  # the umask's mode; equal weights, equal bytes
    written.append(out / "model.safetensors")
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
    # A wrapped model's tokenizer is written unchanged, its begin-token rule the family's own.
    if tm.cfg.model.arch != "hf" and hf_tok(CHECK_TEXT)["input_ids"] != tm.tokenizer.with_bos(ours_ids):
        raise CheckpointError(f"{out}: transformers does not put the begin token first as lmforge does")
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

