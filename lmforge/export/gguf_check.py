"""Read a GGUF file back and run it with llama.cpp's conventions in NumPy, to check an export.

llama.cpp itself is a long source build, so the export is verified against an
independent reference instead: :func:`read_gguf` loads the metadata and the
(dequantized) tensors with ``gguf.GGUFReader``, and :func:`reference_logits` is a
plain NumPy Llama forward pass that uses the tensors exactly as stored, with
llama.cpp's rotary convention (adjacent channel pairs rotate together, which is
what the q/k row permutation of the export is for). :func:`check_gguf` compares
its logits with the lmforge model's.

Example::

    meta, tensors = read_gguf("model.gguf")
    logits = reference_logits(meta, tensors, [0, 17, 42])    # (T, vocab)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.train.checkpoint import CheckpointError
from lmforge.trained import TrainedModel

# Largest logit difference accepted per storage type: absolute for f32 (float rounding only); for the
# rounded types, relative to the largest logit, since their error grows with the weights' scale.
TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "q8_0": 1e-1}


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(metadata, tensors)``: every key's value, and every tensor as float32 in NumPy (row-major) order."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
    return meta, tensors


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_pairs(x: np.ndarray, theta: float, factors: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's 'normal' rotary embedding: channels (2i, 2i+1) of each head turn by pos * theta^(-2i/d),
    divided by ``factors[i]`` when the file has a ``rope_freqs`` tensor (Llama 3's scaled positions)."""
    t, _, d = x.shape  # (T, heads, head_dim)
    freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # (d/2,)
    if factors is not None:
        freq = freq / factors
    angle = np.arange(t, dtype=np.float64)[:, None] * freq[None, :]  # (T, d/2)
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def reference_logits(meta: dict[str, Any], tensors: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    """Logits ``(T, vocab)`` of the GGUF model for one sequence of token ids, in float64 NumPy."""
    arch = meta["general.architecture"]
    n_layers, n_heads = int(meta[f"{arch}.block_count"]), int(meta[f"{arch}.attention.head_count"])
    n_kv = int(meta[f"{arch}.attention.head_count_kv"])
    eps, theta = float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]), float(meta[f"{arch}.rope.freq_base"])
    w = {k: v.astype(np.float64) for k, v in tensors.items()}
    x = w["token_embd.weight"][ids]  # (T, d)
    t, d = x.shape
    hd = d // n_heads
    factors = w.get("rope_freqs.weight")  # (hd/2,) or None
    causal = np.triu(np.full((t, t), -np.inf), k=1)  # (T, T): no looking ahead
    for i in range(n_layers):
        p = f"blk.{i}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q = _rope_pairs((h @ w[p + "attn_q.weight"].T).reshape(t, n_heads, hd), theta, factors)
        k = _rope_pairs((h @ w[p + "attn_k.weight"].T).reshape(t, n_kv, hd), theta, factors)
        v = (h @ w[p + "attn_v.weight"].T).reshape(t, n_kv, hd)
        k, v = np.repeat(k, n_heads // n_kv, axis=1), np.repeat(v, n_heads // n_kv, axis=1)  # (T, nh, hd)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + causal  # (nh, T, T)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        att = np.einsum("hqk,khd->qhd", scores / scores.sum(-1, keepdims=True), v).reshape(t, d)
        x = x + att @ w[p + "attn_output.weight"].T
        h = _rms(x, w[p + "ffn_norm.weight"], eps)
        gate = h @ w[p + "ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])  # no output tensor = tied to the embedding
    return _rms(x, w["output_norm.weight"], eps) @ head.T


def check_gguf(tm: TrainedModel, path: Path, qtype: str) -> dict:
    """Compare the GGUF reference forward with lmforge's logits on a check text; raise beyond the tolerance."""
    from lmforge.export.hf import CHECK_TEXT

    meta, tensors = read_gguf(path)
    ids = tm.tokenizer.encode(CHECK_TEXT)[: min(tm.cfg.model.context, 48)]
    tokens = meta["tokenizer.ggml.tokens"]
    if len(tokens) != tm.tokenizer.vocab_size or any(tokens[i] != tm.tokenizer.id_to_token(i) for i in ids):
        raise CheckpointError(f"{path}: the token list does not match the run's tokenizer")
    model = tm.model.float().cpu().eval()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().numpy()
    diff = float(np.abs(reference_logits(meta, tensors, ids) - ours).max())
    limit = TOLERANCE[qtype] * (1.0 if qtype == "f32" else max(1.0, float(np.abs(ours).max())))
    if diff > limit:
        raise CheckpointError(f"{path}: the GGUF model's logits differ from lmforge's by {diff:.2e} "
                              f"(> {limit:.1e} for {qtype})")
    return {"max_logit_diff": diff, "max_logit": float(np.abs(ours).max()), "checked_tokens": len(ids)}
