"""Tiny Hugging Face model folders of the families people fine-tune, built here from their config classes.

Used by the tests of the ``hf`` architecture, the loader, serving and export. Each folder is
what ``save_pretrained`` writes for a random model of that family (two or three layers, width
32, nothing downloaded) with a byte-level BPE tokenizer trained here by the ``tokenizers``
library on a line of Hamlet, holding the family's own special tokens::

    folder = make_folder("qwen3", tmp_path)       # config.json, model.safetensors, tokenizer files
    tm = load_model(folder)

:data:`FAMILIES` maps each name to its config and to whether lmforge's own Transformer takes it
(``native``: plain Llama rotary positions, Mistral within its window, GPT-2) or the wrapper
(``hf``). Norm weights and biases are moved off their initial 1 and 0, so a skipped or swapped
one shows in the logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
        "and arrows of outrageous fortune, or to take arms against a sea of troubles. ") * 20
VOCAB = 320  # the model's vocabulary; the tokenizer holds a few tokens less, as real checkpoints may
SIZE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@dataclass(frozen=True)
class Family:
    config: Callable[[], Any]  # the transformers config, special token ids still to set
    specials: dict[str, str]  # bos / eos / pad token text
    end_of_turn: str | None  # a further end token generation_config.json declares
    arch: str  # what lmforge loads it as: "transformer" (native) or "hf" (wrapped)
    extra: tuple[str, ...] = ()  # further special tokens of the tokenizer


def _cfg(name: str, **kw: Any) -> Callable[[], Any]:
    def make() -> Any:
        import transformers

        return getattr(transformers, name)(**kw)
    return make


FAMILIES: dict[str, Family] = {
    "llama3": Family(_cfg("LlamaConfig", **SIZE, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
                     {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, "<|eot_id|>", "hf"),
    "qwen2.5": Family(_cfg("Qwen2Config", **SIZE, tie_word_embeddings=True),
                      {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, "<|im_end|>", "hf",
                      ("<|im_start|>",)),
    "qwen3": Family(_cfg("Qwen3Config", **SIZE, head_dim=16, tie_word_embeddings=True),
                    {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, "<|im_end|>", "hf"),
    "gemma3": Family(_cfg("Gemma3TextConfig", **{**SIZE, "num_hidden_layers": 3}, head_dim=16, sliding_window=4,
                          layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
                     {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, "<end_of_turn>", "hf"),
    "phi3": Family(_cfg("Phi3Config", **SIZE),
                   {"bos_token": "<s>", "eos_token": "<|endoftext|>"}, "<|end|>", "hf"),
    "mistral": Family(_cfg("MistralConfig", **SIZE, sliding_window=64),
                      {"bos_token": "<s>", "eos_token": "</s>"}, None, "transformer"),
    "smollm": Family(_cfg("LlamaConfig", **SIZE, tie_word_embeddings=True),
                     {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, "<|im_end|>", "transformer"),
    "gpt2": Family(_cfg("GPT2Config", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4),
                   {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, None, "transformer"),
}


def save_tokenizer(family: Family, folder: Path) -> Any:
    """A byte-level BPE with the family's special tokens, saved as transformers saves a fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    specials = sorted({*family.specials.values(), *([family.end_of_turn] if family.end_of_turn else []),
                       *family.extra})
    inner.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=inner, **family.specials)
    fast.save_pretrained(folder)
    return fast


def make_folder(name: str, root: Path, seed: int = 0) -> Path:
    """``root/name``: a random model of family ``name`` and its tokenizer, as ``save_pretrained`` writes them."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    family, folder = FAMILIES[name], root / name
    torch.manual_seed(seed)
    fast = save_tokenizer(family, folder)
    config = family.config()
    ends = [fast.eos_token_id] + ([fast.convert_tokens_to_ids(family.end_of_turn)] if family.end_of_turn else [])
    config.bos_token_id, config.eos_token_id = fast.bos_token_id, ends[0]
    config.pad_token_id = fast.pad_token_id
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.generation_config = GenerationConfig(bos_token_id=fast.bos_token_id, eos_token_id=ends,
                                               pad_token_id=fast.pad_token_id)
    model.eval().save_pretrained(folder)
    return folder


def tiny_hf_config(vocab_size: int, d_model: int = 32, n_layers: int = 2, context: int = 64, tie: bool = True,
                   dropout: float = 0.0) -> dict[str, Any]:
    """A tiny Qwen3 ``config.json`` (head_dim 16, not width / heads) for ``model.arch=hf`` built from scratch."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=48, num_hidden_layers=n_layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=context,
                       attention_dropout=dropout, tie_word_embeddings=tie).to_dict()


@functools.cache
def reference(folder: Path) -> Any:
    """The folder as transformers itself loads it (float32, eval mode): what lmforge must agree with.

    Loaded once per folder (the tests never change it)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def reference_greedy(folder: Path, prompt_ids: list[int], n: int, end_ids: list[int]) -> list[int]:
    """The tokens transformers' ``generate`` picks greedily after ``prompt_ids``, up to the first end token."""
    with torch.no_grad():
        out = reference(folder).generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False)
    new = out[0, len(prompt_ids):].tolist()
    stops = [i for i, t in enumerate(new) if t in end_ids]
    return new[: stops[0]] if stops else new
