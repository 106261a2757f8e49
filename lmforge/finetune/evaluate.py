"""Before and after: what fine-tuning bought and what it cost, measured the same way on both models.

- A held-out chat task: multiple-choice items ``{"messages": [...], "choices": [...], "label": i}``.
  The prompt is the conversation rendered with the chat template and an assistant generation prompt;
  each choice is scored as the assistant's reply (its tokens and ``<|im_end|>``) by the
  log-likelihood :class:`~lmforge.eval.scoring.Scorer` of the evaluation tasks (a model with its own chat
  template: the prompt and the reply's tokens as that template renders them, :func:`reply_request`); ``acc`` counts items
  whose most likely choice is the label, ``acc_norm`` divides by the choice's length in characters.
- Validation bits per byte on held-out text (the pre-training validation shards of a run, or the
  fine-tuning validation text), with :func:`~lmforge.eval.perplexity.evaluate_tokens`::

    items = load_chat_task(path)
    result = score_chat_task(model, tokenizer, context, items)    # {"acc": ..., "acc_norm": ..., "items": n}

- Held-out preference pairs (``finetune.mode=dpo|simpo``): :func:`pair_logprobs` gives each answer's
  summed log-probability (the tokens the preference loss covers); :func:`preference_report` turns the
  base's and the tuned model's into the model's own preference accuracy and margin (chosen against
  rejected), DPO's implicit reward accuracy and margin (``beta`` times the change of the log-ratio
  from the base), and the drift of the chosen answers' log-probability per token::

    before, after = pair_logprobs(base, pairs), pair_logprobs(tuned, pairs)
    report = preference_report(before, after, beta=0.1)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmforge.data.chat import IM_END, chat_spans, render_chat
from lmforge.data.pack import list_shards, read_shard
from lmforge.data.sources import DataError
from lmforge.eval.perplexity import bits_per_byte, evaluate_tokens
from lmforge.eval.scoring import Scorer
from lmforge.finetune.chat import check_messages
from lmforge.finetune.data import IGNORE, shifted
from lmforge.finetune.pairs import Pair
from lmforge.train.preference import sequence_logprobs


def load_chat_task(path: Path) -> list[dict]:
    """The items of a chat multiple-choice JSONL file; a bad line raises :class:`DataError` with file:line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(r, dict) or not isinstance(r.get("choices"), list) or len(r["choices"]) < 2 \
                    or not all(isinstance(c, str) and c for c in r["choices"]):
                raise DataError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
            label = r.get("label")
            if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(r["choices"]):
                raise DataError(f"{where}: 'label' must be a choice index 0..{len(r['choices']) - 1}")
            # The prompt needs no assistant turn: check it with a placeholder reply.
            messages, _, detail = check_messages({"messages": [*r.get("messages", []),
                                                                {"role": "assistant", "content": "x"}]})
            if messages is None or not r.get("messages"):
                raise DataError(f"{where}: {detail or 'messages must be a non-empty list'}")
            items.append({"id": r.get("id", where), "messages": messages[:-1], "choices": r["choices"],
                          "label": label})
    if not items:
        raise DataError(f"{path}: the task has no items")
    return items


def reply_request(tokenizer, messages: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, reply ids)``: the conversation with the generation prompt, and the reply as the model
    would write it, end of turn included (a model's own template marks both, as in training)."""
    if tokenizer.chat_template is not None:
        ids, spans = chat_spans(tokenizer, [*messages, {"role": "assistant", "content": reply}])
        start, end = spans[-1]
        return ids[:start], ids[start:end]
    prompt = [tokenizer.eot_id, *render_chat(tokenizer, messages, add_generation_prompt=True)]
    return prompt, [*tokenizer.encode(reply), tokenizer.token_to_id(IM_END)]


def score_chat_task(model: nn.Module, tokenizer, context: int, items: list[dict], batch_size: int = 16) -> dict:
    """Accuracy of the most likely reply among each item's choices (see the module docstring)."""
    requests = []
    for it in items:
        try:
            requests += [reply_request(tokenizer, it["messages"], c) for c in it["choices"]]
        except ValueError as e:  # the model's own template refuses the item
            raise DataError(f"{it['id']}: {e}") from None
    scores = iter(Scorer(model, tokenizer, context, batch_size).loglikelihood_tokens(requests))
    acc = acc_norm = 0
    for it in items:
        lls = np.array([next(scores)[0] for _ in it["choices"]])
        chars = np.array([len(c) + 1 for c in it["choices"]], dtype=float)
        acc += int(np.argmax(lls)) == it["label"]
        acc_norm += int(np.argmax(lls / chars)) == it["label"]
    n = len(items)
    return {"items": n, "acc": acc / n, "acc_norm": acc_norm / n,
            "chance": float(np.mean([1 / len(it["choices"]) for it in items]))}


def shard_bpb(model: nn.Module, data_dir: Path, n_bytes: float, eot_id: int, context: int, batch_size: int = 16,
              max_tokens: int | None = None, stride: int | None = None) -> dict | None:
    """Loss and bits per byte on the ``val`` token shards of ``data_dir`` (None when there are none)."""
    shards = list_shards(data_dir, "val")
    if not shards or not n_bytes:
        return None
    tokens = np.concatenate([np.asarray(read_shard(p), dtype=np.int64) for p in shards])
    r = evaluate_tokens(model, tokens, context=context, stride=stride, batch_size=batch_size, bos_id=eot_id,
                        max_tokens=max_tokens)
    scored_bytes = n_bytes * r["tokens"] / max(1, len(tokens))  # max_tokens may score only the start
    return {"loss": r["loss"], "bpb": bits_per_byte(r["nats"], scored_bytes), "tokens": r["tokens"]}


@torch.no_grad()
def pair_logprobs(model: nn.Module, pairs: list[Pair], batch_size: int = 16) -> dict[str, np.ndarray]:
    """Summed log-probabilities and token counts of every pair's chosen and rejected answers."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list] = {"chosen": [], "rejected": [], "n_chosen": [], "n_rejected": []}
    for side in ("chosen", "rejected"):
        for s in range(0, len(pairs), batch_size):
            rows = [shifted(np.array(getattr(p, side).ids), np.array(getattr(p, side).mask))
                    for p in pairs[s: s + batch_size]]
            width = max(len(xs) for xs, _ in rows)
            x = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T); pads are never targets
            y = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            for r, (xs, ys) in enumerate(rows):
                x[r, : len(xs)], y[r, : len(ys)] = torch.from_numpy(xs), torch.from_numpy(ys)
            logp, n = sequence_logprobs(model(x.to(device))[0], y.to(device))
            out[side] += logp.tolist()
            out["n_" + side] += n.tolist()
    model.train(was_training)
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()}


def preference_report(before: dict[str, np.ndarray], after: dict[str, np.ndarray], beta: float,
                      kinds: list[str] | None = None) -> dict:
    """Preference accuracy and margins of the base and the tuned model on the same pairs (see above);
    with ``kinds`` (one per pair), both models' preference accuracy per kind too."""
    def own(lp: dict[str, np.ndarray]) -> dict:
        gap = lp["chosen"] - lp["rejected"]  # nats: how much more likely the chosen answer is
        return {"accuracy": float(np.mean(gap > 0)), "margin": float(np.mean(gap)),
                "chosen_logp_per_token": float(np.mean(lp["chosen"] / np.maximum(lp["n_chosen"], 1)))}

    # DPO's implicit rewards of the tuned model, with the base as reference (both 0 for the base itself).
    chosen = beta * (after["chosen"] - before["chosen"])
    rejected = beta * (after["rejected"] - before["rejected"])
    base, tuned = own(before), own(after)
    by_kind = {}
    for kind in sorted(set(kinds or ()) - {""}):
        pick = np.array([k == kind for k in kinds])
        by_kind[kind] = {"pairs": int(pick.sum()), **{name: float(np.mean((lp["chosen"] - lp["rejected"])[pick] > 0))
                                                      for name, lp in (("base", before), ("finetuned", after))}}
    return {"pairs": len(before["chosen"]), "base": base, "finetuned": tuned, **({"by_kind": by_kind} if by_kind else {}),
            "reward": {"beta": beta, "accuracy": float(np.mean(chosen > rejected)),
                       "margin": float(np.mean(chosen - rejected)), "chosen": float(np.mean(chosen)),
                       "rejected": float(np.mean(rejected))},
            "chosen_logp_drift": tuned["chosen_logp_per_token"] - base["chosen_logp_per_token"]}
