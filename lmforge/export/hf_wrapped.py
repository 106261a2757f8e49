"""Write a wrapped model (``model.arch=hf``) back as its own family: ``lmforge export --format hf``.

A model that lmforge opened from a Hugging Face folder of a family its Transformer does not
compute (Qwen, Gemma, Phi-3, Llama 3.x, ...), and perhaps fine-tuned since, leaves in that
family's own format, written by transformers itself:

- ``config.json`` and ``model.safetensors`` by ``save_pretrained`` of the wrapped module;
- ``generation_config.json`` stopping at every end token lmforge stops at (end of text, end of turn);
- the tokenizer (``tokenizer.json``, ``tokenizer_config.json`` with the model's own special tokens,
  and its chat template when the tokenizer carries one) by ``PreTrainedTokenizerFast.save_pretrained``.

Everything is written into a temporary folder beside ``out`` first and moved in file by file
only when all of it was written, so a failure leaves no half-written export. The check is
:func:`lmforge.export.hf.check_hf` (transformers reloads the folder; logits must agree)::

    files = export_wrapped(tm, Path("exported/qwen-tuned"))
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from lmforge.artifacts import temp_path
from lmforge.models import HFCausalLM
from lmforge.trained import TrainedModel


def save_tokenizer(tm: TrainedModel, out: Path) -> None:
    """The model's tokenizer as transformers saves a fast tokenizer: its own special tokens and chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = tm.tokenizer
    names = {k: v for k, v in tok.specials.items() if v is not None}
    template = getattr(tok, "chat_template", None)  # a tokenizer that carries its model's template
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.inner, model_max_length=tm.cfg.model.context,
                                   clean_up_tokenization_spaces=False, **names,
                                   **({"chat_template": template} if template else {}))
    fast.save_pretrained(str(out))


def export_wrapped(tm: TrainedModel, out: Path) -> list[Path]:
    """Write ``tm`` (a wrapped transformers model) to the folder ``out``; returns the files written."""
    model = tm.model
    assert isinstance(model, HFCausalLM)
    hf = model.hf
    tok = tm.tokenizer
    gen = hf.generation_config
    bos, pad = (tok.specials[k] and tok.token_to_id(tok.specials[k]) for k in ("bos_token", "pad_token"))
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = bos, tok.end_ids, pad  # None where the family has none
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(tm, tmp)
        out.mkdir(exist_ok=True)
        written = []
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
            written.append(out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
