"""Export to GGUF, the single-file format of llama.cpp and the runtimes built on it.

``lmforge export RUN --format gguf --out model.gguf [--export.gguf_type=q8_0]`` writes
the Transformer, or a wrapped Hugging Face model of the Llama family (Llama 3.x with its
scaled rotary positions included; :mod:`lmforge.export.gguf_llama` says what is written and
refuses other families), as a ``llama`` architecture GGUF with the ``gguf`` package:

- hyperparameters (context, widths, heads, rotary base, RMSNorm epsilon);
- tensors under llama.cpp's names (``token_embd``, ``blk.N.attn_q``, ...), with the
  rows of the query and key projections permuted as llama.cpp's own converter
  does: its rotary embedding rotates adjacent pairs of channels, while lmforge
  (like Hugging Face) rotates the two halves of each head;
- the tokenizer as a GPT-2 style byte-level BPE (tokens, merges, types; special
  tokens are control tokens), its special ids and chat template (lmforge's ChatML, or
  the wrapped model's own).

Matrices are stored as f32, f16 or Q8_0 (``export.gguf_type``); norms stay f32, and
a matrix whose rows are not a multiple of Q8_0's 32-value blocks stays f32.
Afterwards (``export.check``) the file is read back and
:mod:`lmforge.export.gguf_check` runs it through a NumPy forward pass with
llama.cpp's conventions, compared against lmforge's logits. Only the byte-level
BPE tokenizer maps onto GGUF's ``gpt2`` model; a ``char`` tokenizer is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.artifacts import atomic_path
from lmforge.config import ConfigError
from lmforge.export.gguf_llama import LlamaSpec, llama_spec
from lmforge.trained import TrainedModel

Q8_BLOCK = 32
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder a q/k projection's rows per head from (half 0, half 1) to interleaved pairs, as llama.cpp expects.

    Within each head, output row ``i`` of the first half and row ``i`` of the second half
    (the pair that rotate-half mixes) become rows ``2i`` and ``2i + 1``.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`permute_rotary`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_tables(tm: TrainedModel) -> tuple[list[str], list[int], list[str]]:
    """GGUF's token strings, token types and merges for a byte-level BPE tokenizer."""
    import gguf

    tok = tm.tokenizer
    spec = json.loads(tok.inner.to_str())
    model = spec.get("model", {})
    if tok.kind != "bpe" or model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ConfigError("export.format=gguf needs a byte-level BPE tokenizer (tokenizer.kind=bpe); this run's "
                          f"tokenizer is '{tok.kind}'. Use --format hf or --format lmforge")
    vocab = tok.vocab_size
    tokens = [tok.id_to_token(i) or f"[UNUSED_{i}]" for i in range(vocab)]
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(vocab)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def _matrix(w: np.ndarray, qtype: str):
    """``(data, raw_dtype)`` for add_tensor: the matrix in the requested type, or f32 where it cannot be."""
    import gguf

    if qtype == "f16":
        return w.astype(np.float16), None
    if qtype == "q8_0" and w.shape[-1] % Q8_BLOCK == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(w, kind), kind
    return w, None


def export_gguf(tm: TrainedModel, out_file: Path, qtype: str = "f32") -> list[Path]:
    """Write ``tm`` to ``out_file`` (a .gguf path); returns the files written."""
    import gguf

    if qtype not in _FILE_TYPES:
        raise ConfigError(f"export.format=gguf: export.gguf_type must be one of {', '.join(_FILE_TYPES)} "
                          f"(got {qtype!r})")
    spec = llama_spec(tm)  # refuses what the llama architecture cannot hold, before anything is written
    tokens, types, merges = tokenizer_tables(tm)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_file) as tmp:  # a .gguf on disk is whole: llama.cpp reads no partial file
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(tm.cfg.name)
        writer.add_context_length(spec.context)
        writer.add_embedding_length(spec.d_model)
        writer.add_block_count(spec.n_layers)
        writer.add_feed_forward_length(spec.ffn)
        writer.add_head_count(spec.n_heads)
        writer.add_head_count_kv(spec.n_kv)
        writer.add_rope_dimension_count(spec.d_model // spec.n_heads)
        writer.add_rope_freq_base(spec.rope_theta)
        writer.add_layer_norm_rms_eps(spec.norm_eps)
        writer.add_vocab_size(tm.cfg.model.vocab_size)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[qtype])))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(spec.pre_tokenizer)  # the split before byte-level BPE
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(spec.bos)
        writer.add_eos_token_id(spec.eos)
        writer.add_eot_token_id(spec.eot)
        if tm.tokenizer.pad_id is not None:
            writer.add_pad_token_id(tm.tokenizer.pad_id)
        writer.add_add_bos_token(tm.tokenizer.add_bos)  # llama.cpp then scores and prompts as lmforge does
        writer.add_add_eos_token(False)
        if spec.chat_template:
            writer.add_chat_template(spec.chat_template)
        _add_tensors(writer, spec, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return [out_file]


def _add_tensors(writer: Any, spec: LlamaSpec, qtype: str) -> None:
    """The weights under llama.cpp's names, q/k rows permuted for its rotary convention; Llama 3's factors."""
    import gguf

    if spec.rope_factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", spec.rope_factors)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, spec.n_layers)
    for hf_name, tensor in spec.tensors.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some checkpoints carry; llama.cpp computes the frequencies itself
        w = tensor.detach().to("cpu", torch.float32).numpy()
        if hf_name.endswith("q_proj.weight"):
            w = permute_rotary(w, spec.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = permute_rotary(w, spec.n_kv)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name}")
        data, raw = (w, None) if w.ndim == 1 else _matrix(np.ascontiguousarray(w), qtype)
        writer.add_tensor(name, data, raw_dtype=raw)
