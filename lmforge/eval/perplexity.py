"""Loss, perplexity, bits per byte and next-token accuracy of a model on held-out text.

Text longer than the model's context is scored with a sliding window: the first window predicts
all of its targets; each next one ends ``stride`` tokens later and predicts only the targets not yet
predicted, the tokens before them serving as context. Every target is predicted exactly once; a
smaller stride gives each token more context at the cost of more forward passes. The last window is
aligned to the end of the text, so the tail keeps a full context and every window has the same length.

With ``bos_id`` (the tokenizer's begin token, lmforge's end-of-text id) in front, every token of the text is predicted, so
``nats / ln 2 / bytes`` is the exact bits per byte, comparable across tokenizers::

    from lmforge.eval.perplexity import evaluate_text, evaluate_tokens
    r = evaluate_text(model, tokenizer, open("heldout.txt").read(), context=256, stride=128)
    print(r["loss"], r["ppl"], r["bpb"], r["acc"])
    r = evaluate_tokens(model, token_ids, context=256, bos_id=tokenizer.bos_id)

Any model with ``forward(idx (B, T)) -> (logits (B, T, V), loss)`` can be evaluated.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm


def _windows(n_targets: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, done)`` per window: inputs ``seq[start:end]`` predict ``seq[start+1:end+1]``,
    of which the targets at positions ``done+1 .. end`` are new (earlier ones were scored before)."""
    out, done = [], 0
    while done < n_targets:
        end = min(done + (context if done == 0 else stride), n_targets)
        start = max(0, end - context)
        out.append((start, end, done))
        done = end
    return out


def _batches(windows: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length, at most ``batch_size`` per forward pass."""
    batches: list[list[tuple[int, int, int]]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0][1] - last[0][0] == w[1] - w[0]:
            last.append(w)
        else:
            batches.append([w])
    return batches


@torch.no_grad()
def evaluate_tokens(model: nn.Module, tokens: np.ndarray | torch.Tensor, context: int, stride: int | None = None,
                    batch_size: int = 16, device: str | torch.device = "cpu", bos_id: int | None = None,
                    max_tokens: int | None = None, progress: bool = False) -> dict:
    """Score 1-D token ids: ``loss`` (mean nats per predicted token), ``ppl``, ``acc``, ``tokens``, ``nats``.

    ``bos_id`` is put in front so the first token is predicted too; without it the first token is only
    context. ``max_tokens`` keeps the first that many ids. The model's train/eval mode is restored after.
    """
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"tokens must be a 1-D array of integer ids (got shape {arr.shape}, dtype {arr.dtype})")
    if context < 1 or batch_size < 1:
        raise ValueError(f"context ({context}) and batch_size ({batch_size}) must be at least 1")
    stride = context if stride is None else stride
    if not 1 <= stride <= context:
        raise ValueError(f"stride ({stride}) must be between 1 and the context ({context}), or tokens are skipped")
    if max_tokens is not None:
        arr = arr[:max_tokens]
    seq = np.concatenate([np.array([bos_id], dtype=np.int64), arr.astype(np.int64)]) if bos_id is not None else arr
    lowest, highest = (int(seq.min()), int(seq.max())) if seq.size else (0, 0)
    if lowest < 0:
        raise ValueError(f"tokens hold a negative id ({lowest})")
    n_targets = len(seq) - 1
    if n_targets < 1:
        raise ValueError(f"nothing to evaluate: {len(arr)} token(s) leave no target to predict"
                         + ("" if bos_id is not None else " (pass bos_id to predict the first token too)"))

    windows = _windows(n_targets, context, stride)
    device = torch.device(device)
    nats, correct, count = 0.0, 0, 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(windows), unit="window", desc="eval", disable=not progress)
    try:
        for batch in _batches(windows, batch_size):
            x = torch.from_numpy(np.stack([seq[s:e] for s, e, _ in batch]).astype(np.int64)).to(device)  # (B, L)
            y = torch.from_numpy(np.stack([seq[s + 1:e + 1] for s, e, _ in batch]).astype(np.int64)).to(device)
            # Position j of a window predicts target start+j+1; only targets after `done` are new.
            first_new = torch.tensor([done - s for s, _, done in batch], device=device)  # (B,)
            new = torch.arange(x.shape[1], device=device)[None, :] >= first_new[:, None]  # (B, L)
            try:
                logits, _ = model(x)
            except IndexError as e:  # an embedding lookup past the vocabulary
                raise ValueError(f"token ids up to {highest} do not fit the model's vocabulary ({e})") from None
            if logits.shape[:2] != x.shape:
                raise RuntimeError(f"model returned logits of shape {tuple(logits.shape)} for input "
                                   f"{tuple(x.shape)}; evaluation needs logits for every position")
            if highest >= logits.shape[-1]:
                raise ValueError(f"token id {highest} is outside the model's vocabulary of {logits.shape[-1]}")
            picked = logits[new].float()  # (M, V): only the new targets, in float32 whatever the model dtype
            target = y[new]  # (M,)
            nats += F.cross_entropy(picked, target, reduction="sum").item()
            correct += int((picked.argmax(-1) == target).sum().item())
            count += target.numel()
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    assert count == n_targets, "sliding windows must predict every target exactly once"
    loss = nats / count
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf, "acc": correct / count,
            "tokens": count, "nats": nats}


def bits_per_byte(nats: float, n_bytes: float) -> float:
    """Total nats over the text's UTF-8 bytes, in bits: a tokenizer-independent loss."""
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count (got {n_bytes})")
    return nats / math.log(2) / n_bytes


def evaluate_text(model: nn.Module, tokenizer, text: str, context: int, **kw) -> dict:
    """:func:`evaluate_tokens` on ``tokenizer.encode(text)`` with ``bos_id = tokenizer.bos_id``, plus ``bytes``
    and ``bpb``. With ``max_tokens`` cutting the text, bytes are those of the decoded ids that were scored."""
    if not text:
        raise ValueError("nothing to evaluate: the text is empty")
    ids = list(tokenizer.encode(text))
    if not ids:
        raise ValueError("nothing to evaluate: the tokenizer produced no tokens for the text")
    kw.setdefault("bos_id", tokenizer.bos_id)
    max_tokens = kw.pop("max_tokens", None)
    n_bytes = len(text.encode("utf-8"))
    if max_tokens is not None and len(ids) > max_tokens:
        ids = ids[:max_tokens]
        n_bytes = len(tokenizer.decode(ids).encode("utf-8"))
    result = evaluate_tokens(model, np.asarray(ids, dtype=np.int64), context, **kw)
    result["bytes"] = n_bytes
    result["bpb"] = bits_per_byte(result["nats"], n_bytes)
    return result
