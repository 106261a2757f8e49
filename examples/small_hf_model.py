"""Write a small Hugging Face model folder that stands in for a downloaded one, with nothing downloaded.

The folder is what ``save_pretrained`` writes for a Qwen2.5-architecture causal LM (random weights,
width 384, 6 layers, about 11 M parameters) with a byte-level BPE tokenizer trained on lmforge's
embedded corpus, Qwen2.5's special tokens and its real chat template. docs/finetuning.md measures
the fine-tuning path on it; a real folder (``huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct``)
goes through the same commands. Run::

    python examples/small_hf_model.py /tmp/qwen-small
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from lmforge.data.sources import embedded_corpus

TEMPLATE = Path(__file__).parents[1] / "tests" / "data" / "chat_templates" / "qwen2_5.jinja"


def main(out: Path) -> None:
    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.train_from_iterator((d.text for d in embedded_corpus()), trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = TEMPLATE.read_text(encoding="utf-8")
    fast.save_pretrained(out)
    config = Qwen2Config(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    ends = [fast.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    model.generation_config = GenerationConfig(eos_token_id=ends, pad_token_id=fast.pad_token_id)
    model.save_pretrained(out)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
