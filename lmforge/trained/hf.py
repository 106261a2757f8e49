"""Read a local Hugging Face causal-LM folder as an lmforge model: weights, tokenizer and config.

A family that lmforge's Transformer computes exactly (Llama with plain rotary positions, Mistral
within its window, GPT-2, SmolLM; :func:`~lmforge.trained.hf_config.native_config`) loads into it,
renamed as below, because it decodes faster there. Every other causal LM that transformers loads
(Llama 3.x, Qwen2/2.5/3, Gemma, Phi-3, ...) loads with ``AutoModelForCausalLM.from_pretrained``
into the ``hf`` architecture (:mod:`lmforge.models.hf_causal`), after checking that it is a
decoder-only causal LM, that every weight is in the folder and that it decodes step by step
exactly as its full forward (:func:`check_decoding`).

The folder is what ``save_pretrained`` writes: ``config.json`` (mapped by
:mod:`lmforge.trained.hf_config`), ``model.safetensors`` (or a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` read with
``weights_only=True``, never unpickling code) and ``tokenizer.json`` with its
``tokenizer_config.json`` / ``special_tokens_map.json``. Tensors are renamed onto
lmforge's Transformer:

- Llama: ``model.embed_tokens`` -> ``tok_emb``, ``model.layers.N.self_attn.q_proj`` ->
  ``layers.N.attn.q``, ``mlp.gate_proj`` -> ``mlp.gate``, ... (same shapes);
- GPT-2: ``wte`` / ``wpe`` -> ``tok_emb`` / ``pos_emb``, ``ln_1`` / ``ln_2`` / ``ln_f`` ->
  ``attn_norm`` / ``mlp_norm`` / ``norm``; its ``Conv1D`` weights are stored
  ``(in, out)``, the transpose of ``nn.Linear``'s, and ``c_attn`` holds q, k and v side by side.

Every tensor must find its place and every parameter must be filled; a tied
``lm_head`` comes from the embedding. The end-of-text token is the model's own
(tokenizer files first, then ``generation_config.json`` / ``config.json`` ids), so
generation stops where the original model stops::

    tm = load_hf_folder(Path("my-gpt2"))      # a TrainedModel; tm.model is a registry Transformer
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import load_file
from torch import Tensor

from lmforge.config import ModelConfig, RunConfig
from lmforge.data.chat import ChatTemplateError, template_end_token
from lmforge.data.tokenizer import DEFAULT_SPECIALS, Tokenizer, read_add_bos, read_chat_template, read_specials
from lmforge.models import HFCausalLM, LanguageModel, build_model
from lmforge.train.checkpoint import CheckpointError
from lmforge.trained.hf_config import LLAMA_TYPES, native_config, wrapped_config
from lmforge.trained.model import TrainedModel
from lmforge.trained.native import MARKER

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_LLAMA_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn.q", "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v", "self_attn.o_proj": "attn.o", "post_attention_layernorm": "mlp_norm",
    "mlp.gate_proj": "mlp.gate", "mlp.up_proj": "mlp.up", "mlp.down_proj": "mlp.down",
}
# GPT-2 Conv1D modules -> ours; c_attn is split into q, k, v separately.
_GPT2_LAYER = {"ln_1": "attn_norm", "ln_2": "mlp_norm", "attn.c_proj": "attn.o", "mlp.c_fc": "mlp.up",
               "mlp.c_proj": "mlp.down"}
_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# Buffers some checkpoints carry that are not weights (causal masks, rotary frequencies).
_NOT_WEIGHTS = re.compile(r".*(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def weights_path(folder: Path) -> Path:
    """The folder's weights file (or shard index), or a CheckpointError naming the files looked for."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def read_weights(folder: Path) -> tuple[dict[str, Tensor], Path]:
    """All tensors of the folder's weights file(s) and the file named in errors."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name == "pytorch_model.bin":
                return torch.load(path, map_location="cpu", weights_only=True), path
            if name.endswith(".index.json"):
                shards = sorted(set(read_json(path).get("weight_map", {}).values()))
                return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}, path
            return load_file(str(path)), path
        except CheckpointError:
            raise
        except Exception as e:  # safetensors and torch.load raise many kinds for a damaged file
            raise CheckpointError(f"{path} is not a readable weights file ({e})") from None
    raise CheckpointError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def _llama_names(hf: dict[str, Tensor]) -> dict[str, tuple[str, Tensor]]:
    """ours -> (HF name, tensor) for a Llama-family state dict."""
    out: dict[str, tuple[str, Tensor]] = {}
    for key, t in hf.items():
        top = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight",
               "lm_head.weight": "lm_head.weight"}
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in top:
            out[top[key]] = (key, t)
        elif m and m.group(2) in _LLAMA_LAYER:
            out[f"layers.{m.group(1)}.{_LLAMA_LAYER[m.group(2)]}.{m.group(3)}"] = (key, t)
        elif not _NOT_WEIGHTS.fullmatch(key):
            out[f"?{key}"] = (key, t)  # no counterpart: reported by the caller
    return out


def _gpt2_names(hf: dict[str, Tensor]) -> dict[str, tuple[str, Tensor]]:
    """ours -> (HF name, tensor) for a GPT-2 state dict (with or without the ``transformer.`` prefix)."""
    out: dict[str, tuple[str, Tensor]] = {}
    for key, t in hf.items():
        bare = key.removeprefix("transformer.")
        top = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "ln_f.weight": "norm.weight",
               "ln_f.bias": "norm.bias", "lm_head.weight": "lm_head.weight"}
        m = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", bare)
        if bare in top:
            out[top[bare]] = (key, t)
        elif m and (m.group(2) in _GPT2_LAYER or m.group(2) == "attn.c_attn"):
            layer, module, kind = m.groups()
            if module in _GPT2_CONV1D and kind == "weight":
                t = t.t()  # Conv1D (in, out) -> Linear (out, in)
            if module == "attn.c_attn":
                if t.shape[0] % 3:
                    raise CheckpointError(f"tensor '{key}' of shape {tuple(t.shape)} does not split into q, k, v")
                for part, chunk in zip("qkv", t.chunk(3, dim=0), strict=True):
                    out[f"layers.{layer}.attn.{part}.{kind}"] = (key, chunk)
            else:
                out[f"layers.{layer}.{_GPT2_LAYER[module]}.{kind}"] = (key, t)
        elif not _NOT_WEIGHTS.fullmatch(key):
            out[f"?{key}"] = (key, t)
    return out


def map_weights(hf: dict[str, Tensor], model_type: str, expected: dict[str, Tensor], tied: bool,
                where: Path) -> dict[str, Tensor]:
    """The state dict of our model (``expected`` gives names and shapes) from Hugging Face tensors."""
    named = _llama_names(hf) if model_type in LLAMA_TYPES else _gpt2_names(hf)
    strays = [key for ours, (key, _) in named.items() if ours.startswith("?")]
    if strays:
        raise CheckpointError(f"{where}: tensor '{strays[0]}' has no counterpart in lmforge's Transformer"
                              + (f" (and {len(strays) - 1} more)" if len(strays) > 1 else ""))
    if tied:
        named.pop("lm_head.weight", None)  # re-tied from the embedding below
    out: dict[str, Tensor] = {}
    for ours, (key, t) in named.items():
        if ours not in expected:
            raise CheckpointError(f"{where}: tensor '{key}' has no counterpart in this config (no '{ours}')")
        if tuple(t.shape) != tuple(expected[ours].shape):
            raise CheckpointError(f"{where}: tensor '{key}' has shape {tuple(t.shape)}, but config.json "
                                  f"implies {tuple(expected[ours].shape)} for it")
        out[ours] = t.to(torch.float32).contiguous()
    if tied:
        out["lm_head.weight"] = out.get("tok_emb.weight", expected["lm_head.weight"])
    missing = sorted(set(expected) - set(out))
    if missing:
        raise CheckpointError(f"{where}: no tensor for lmforge's '{missing[0]}'"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return out


def load_tokenizer(folder: Path, hf: dict[str, Any], vocab_size: int) -> Tokenizer:
    """``folder/tokenizer.json`` with the model's own special tokens; its ids must fit the model's vocabulary."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no tokenizer.json (lmforge reads the fast-tokenizer file that "
                              f"PreTrainedTokenizerFast.save_pretrained writes)")
    try:
        inner = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any parse error
        raise CheckpointError(f"{path} is not a valid tokenizer.json ({e})") from None
    n_tokens = inner.get_vocab_size(with_added_tokens=True)
    if n_tokens > vocab_size:
        raise CheckpointError(f"{path} has {n_tokens} tokens but config.json's vocab_size is {vocab_size}: "
                              f"the tokenizer does not belong to this model")
    specials: dict[str, str | None] = read_specials(folder)
    generation = read_json(folder / "generation_config.json") if (folder / "generation_config.json").is_file() else {}
    for key in DEFAULT_SPECIALS:
        if key in specials:
            continue
        # Ids in generation_config.json (what generate() stops on) or config.json; a list names several.
        found = generation.get(f"{key[:3]}_token_id", hf.get(f"{key[:3]}_token_id"))
        found = found[0] if isinstance(found, list) and found else found
        specials[key] = inner.id_to_token(found) if isinstance(found, int) else None
    if specials["eos_token"] is None or inner.token_to_id(specials["eos_token"]) is None:
        raise CheckpointError(f"{folder}: no end-of-text token: none of tokenizer_config.json, "
                              f"special_tokens_map.json, generation_config.json or config.json names one "
                              f"that tokenizer.json holds")
    ends = end_tokens(inner, generation, hf)
    tok = Tokenizer(inner, origin=str(path), specials=specials, end_tokens=ends,
                    chat_template=read_chat_template(folder), add_bos=begin_rule(folder, inner, specials["bos_token"]))
    # The template's end of turn stops generation too (a base model's config may list only its end of text).
    # A template that cannot mark turns adds none; it is refused, with its reason, where a chat is rendered.
    with contextlib.suppress(ChatTemplateError):
        if tok.chat_template is not None:
            tok.end_tokens = sorted({*tok.end_tokens, template_end_token(tok)})
    return tok


def begin_rule(folder: Path, inner: tokenizers.Tokenizer, bos: str | None) -> bool:
    """Whether the tokenizer puts a begin token first, as transformers decides: ``add_bos_token`` of
    ``tokenizer_config.json`` when it says, else whether ``tokenizer.json``'s post-processor adds ``bos``
    (Llama 3 and Gemma do; Qwen and GPT-2 do not)."""
    declared = read_add_bos(folder)
    if declared is not None:
        return declared
    bos_id = None if bos is None else inner.token_to_id(bos)
    return bos_id is not None and inner.encode("a", add_special_tokens=True).ids[:1] == [bos_id]


def end_tokens(inner: tokenizers.Tokenizer, generation: dict[str, Any], hf: dict[str, Any]) -> list[str]:
    """Every end token that ``generation_config.json`` and ``config.json`` declare (``eos_token_id``: an id or a
    list of them, e.g. Llama 3's end of text and end of turn), so generation stops at each as transformers does."""
    out = []
    for source in (generation, hf):
        found = source.get("eos_token_id")
        for i in found if isinstance(found, list) else [found]:
            token = inner.id_to_token(i) if isinstance(i, int) and not isinstance(i, bool) else None
            if token is not None:
                out.append(token)
    return out


def is_hf_folder(path: Path) -> bool:
    """True for a folder that looks like a Hugging Face model (config.json or weights under HF's names)."""
    return path.is_dir() and not (path / MARKER).is_file() and any(
        (path / name).is_file() for name in ("config.json", *WEIGHT_FILES))


def load_hf_folder(folder: Path, device: str | torch.device = "cpu") -> TrainedModel:
    """A Hugging Face causal-LM folder as a :class:`TrainedModel` (step 0): native when exact, else wrapped."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json, so it is not a Hugging Face model folder")
    hf = read_json(config_path)
    mcfg = native_config(hf, config_path) or wrapped_config(hf, config_path)
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", folder.resolve().name) or "model"
    cfg = RunConfig(name=name, model=mcfg)
    tokenizer = load_tokenizer(folder, hf, mcfg.vocab_size)
    model = load_native_weights(folder, hf, mcfg) if mcfg.arch == "transformer" else load_wrapped(folder, mcfg)
    model.to(device).eval()
    return TrainedModel(model=model, tokenizer=tokenizer, cfg=cfg, path=folder, step=0)


def load_native_weights(folder: Path, hf: dict[str, Any], mcfg: ModelConfig) -> LanguageModel:
    """lmforge's Transformer with the folder's tensors renamed onto it."""
    weights, where = read_weights(folder)
    with torch.device("meta"):  # names and shapes only; the real model is built once the weights fit
        expected = build_model(mcfg).state_dict()
    state = map_weights(weights, hf["model_type"], expected, mcfg.tie_embeddings, where)
    model = build_model(mcfg)
    model.load_state_dict(state, strict=True)  # copies in place: a tied head stays tied
    return model


def load_wrapped(folder: Path, mcfg: ModelConfig) -> HFCausalLM:
    """The folder through ``AutoModelForCausalLM.from_pretrained`` (float32), every weight present, as ``model.arch=hf``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    where = weights_path(folder)
    bar, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    # Its per-tensor progress bar and notes (kernel fallbacks, ...) would fill the terminal of every verb;
    # what matters to the user is said below, as one error or not at all.
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        try:
            hf_model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                                  output_loading_info=True)
        except Exception as e:  # transformers raises many kinds for a damaged or foreign folder
            raise CheckpointError(f"{folder}: transformers cannot load it "
                                  f"({str(e).strip().splitlines()[0]})") from None
        missing = sorted(info.get("missing_keys", []))
        if missing:  # transformers would start these from random values; a model is loaded whole or not at all
            raise CheckpointError(f"{where}: no tensor for '{missing[0]}'"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        model = HFCausalLM(mcfg, hf_model=hf_model)
        check_decoding(model, folder)
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()
    return model


def check_decoding(model: HFCausalLM, folder: Path, tolerance: float = 1e-3) -> None:
    """Refuse a family whose step-by-step decoding (lmforge's decode state) differs from its full forward.

    Five tokens as a prefill of three, then two single steps, against one forward: float32 rounding
    (about 1e-6 of the logits' scale) passes, attention that ignores the cache or the mask does not.
    """
    model.eval()
    idx = torch.arange(5)[None, :] % model.cfg.vocab_size  # (1, 5)
    try:
        with torch.inference_mode():
            full = model(idx)[0]
            a, state = model.step(idx[:, :3], model.new_state(1))
            b, state = model.step(idx[:, 3:4], state)
            c, _ = model.step(idx[:, 4:], state)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    diff = float((torch.cat([a, b, c], dim=1) - full).abs().max())
    if not diff <= tolerance * max(1.0, float(full.abs().max())):
        raise CheckpointError(f"{folder}: {type(model.hf).__name__} decoded step by step differs from its full "
                              f"forward (max logit difference {diff:.2e}), so lmforge cannot serve it")
