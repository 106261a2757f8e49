"""Preference pairs for ``finetune.mode=dpo|simpo``: read, check, encode with the chat template, save.

Input is JSONL, one pair per line: a prompt (a user message as a string, or the conversation so far as
OpenAI ``messages`` ending before the answer) and two assistant answers; an optional ``kind`` string
names the kind of pair, and held-out figures are then given per kind too::

    {"prompt": "Who speaks next?", "chosen": "HAMLET", "rejected": "OPHELIA"}
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}],
     "chosen": "...", "rejected": "..."}

Both answers are encoded as one assistant turn after the same prompt ids, in the model's own chat
template when it has one (the answer's span and its end-of-turn token, read from the template as chat
fine-tuning reads them: :func:`lmforge.data.chat.chat_spans`), else in lmforge's ChatML turns
(:func:`encode_turn`); the loss mask covers the answer's tokens and its end of turn only. A pair whose answers would overflow ``max_length`` has
them cut to fit (counted as truncated); a bad line (missing or empty field, ``chosen == rejected``, a
prompt that leaves no room for an answer) stops with its file and line, or is skipped and counted
(``finetune.on_bad_line=skip``). Usage::

    pairs, report = read_pairs(["prefs.jsonl"], tokenizer, max_length=256, on_bad_line="stop")
    save_pairs(pairs, Path("runs/x/finetune/data/pairs_train.npz"))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.artifacts import AtomicFile
from lmforge.data.chat import chat_spans
from lmforge.data.sources import DataError
from lmforge.finetune.chat import Example, ReadReport, bad_line, check_messages, encode_turn, jsonl_lines
from lmforge.finetune.data import load_examples


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    where: str  # file:line
    kind: str = ""  # the record's optional "kind" (the embedded set's kinds of rejected answer), for reports


def _prompt_messages(record: dict) -> tuple[list[dict] | None, str]:
    """The prompt's messages, or ``(None, detail)`` when the record has no usable prompt."""
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return [{"role": "user", "content": record["prompt"]}], ""
    if "messages" in record:
        # The prompt conversation needs no assistant turn: check it as if one followed.
        messages, _, detail = check_messages({"messages": [*record["messages"], {"role": "assistant", "content": "x"}]}
                                             if isinstance(record["messages"], list) else record)
        return (messages[:-1], "") if messages else (None, detail)
    return None, "a pair needs a non-empty 'prompt' string or a 'messages' list"


def check_pair(record: object) -> tuple[tuple[list[dict], str, str] | None, str, str]:
    """``((prompt messages, chosen, rejected), "", "")`` or ``(None, reason, detail)``."""
    if not isinstance(record, dict):
        return None, "not an object", "a line must be a JSON object with 'prompt', 'chosen' and 'rejected'"
    for key in ("chosen", "rejected"):
        value = record.get(key)
        if value is None:
            return None, f"no {key}", f"the '{key}' answer is missing"
        if not isinstance(value, str) or not value.strip():
            return None, f"empty {key}", f"'{key}' must be a non-empty string"
    if record["chosen"] == record["rejected"]:
        return None, "chosen == rejected", "'chosen' and 'rejected' are the same answer, so nothing to prefer"
    prompt, detail = _prompt_messages(record)
    if prompt is None:
        return None, "no prompt", detail
    return (prompt, record["chosen"], record["rejected"]), "", ""


def _answer_ids(tokenizer, prompt: list[dict], answer: str) -> tuple[list[int], list[int], list[int]]:
    """``(prompt ids, answer ids, answer mask)`` in the model's chat template: its own (the answer's span and
    its end of turn, read from the template as fine-tuning reads it) or lmforge's ChatML turns."""
    if getattr(tokenizer, "chat_template", None) is not None:
        ids, spans = chat_spans(tokenizer, [*prompt, {"role": "assistant", "content": answer}])
        start, end = spans[-1]
        return ids[:start], ids[start:end], [1] * (end - start)
    head = [t for m in prompt for t in encode_turn(tokenizer, m)[0]]
    ids, mask = encode_turn(tokenizer, {"role": "assistant", "content": answer})
    return head, ids, mask


def encode_pair(tokenizer, prompt: list[dict], chosen: str, rejected: str, max_length: int) -> tuple[Pair, bool] | str:
    """Both answers after the prompt's ids, cut to ``max_length`` tokens; or why the pair cannot fit."""
    out, truncated = [], False
    for answer in (chosen, rejected):
        head, ids, mask = _answer_ids(tokenizer, prompt, answer)
        lead = mask.index(1) if 1 in mask else len(mask)  # the assistant header ChatML puts before the answer
        if max_length - len(head) - lead < 2:
            return (f"prompt of {len(head)} tokens leaves no room for an answer within "
                    f"finetune.max_length={max_length}")
        ids, mask = [*head, *ids], [0] * len(head) + mask
        truncated |= len(ids) > max_length
        out.append(Example(ids[:max_length], mask[:max_length], len(ids) > max_length))
    return Pair(out[0], out[1], ""), truncated


def read_pairs(paths: Sequence[str | Path], tokenizer, max_length: int, on_bad_line: str = "stop",
               report: ReadReport | None = None) -> tuple[list[Pair], ReadReport]:
    """Every usable pair of the JSONL files (see the module docstring); blank lines are ignored."""
    report = report or ReadReport()
    out: list[Pair] = []
    for raw in paths:
        path = Path(raw)
        start = report.lines
        for where, record, not_json in jsonl_lines(path, "preference data", report):
            parsed, reason, detail = (None, "malformed JSON", not_json) if not_json else check_pair(record)
            if parsed is not None:
                encoded = encode_pair(tokenizer, *parsed, max_length)
                if isinstance(encoded, str):
                    parsed, reason, detail = None, "prompt too long", encoded
            if parsed is None:
                bad_line(report, on_bad_line, where, reason, detail)
                continue
            pair, _ = encoded
            pair.where = where
            pair.kind = record["kind"] if isinstance(record.get("kind"), str) else ""
            report.kept += 1
            out.append(pair)
        if report.lines == start:
            raise DataError(f"{path}: no preference pairs (the file is empty)")
    return out, report


def save_pairs(pairs: list[Pair], path: Path) -> None:
    """One ``.npz`` (no pickles): for chosen and rejected, concatenated ids and masks and offsets."""
    arrays = {}
    for side in ("chosen", "rejected"):
        examples = [getattr(p, side) for p in pairs]
        lengths = np.array([len(e.ids) for e in examples], dtype=np.int64)
        arrays[f"{side}_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        arrays[f"{side}_ids"] = np.array([t for e in examples for t in e.ids], dtype=np.int64)
        arrays[f"{side}_mask"] = np.array([m for e in examples for m in e.mask], dtype=np.uint8)
    with AtomicFile(path) as f:
        np.savez(f, **arrays)


def load_pairs(path: Path) -> list[Pair]:
    """The pairs :func:`save_pairs` wrote (their file and line are not kept)."""
    sides = [load_examples(path, f"{side}_") for side in ("chosen", "rejected")]
    out = []
    for i in range(len(sides[0][2]) - 1):
        ex = [Example(ids[o[i]: o[i + 1]].tolist(), mask[o[i]: o[i + 1]].tolist()) for ids, mask, o in sides]
        out.append(Pair(ex[0], ex[1], f"{path}#{i}"))
    return out


def pair_stats(pairs: list[Pair]) -> dict:
    return {"kept": len(pairs), "truncated": sum(p.chosen.truncated or p.rejected.truncated for p in pairs),
            "tokens": sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)}
