"""Conversations for chat fine-tuning: read, check, render to token ids with a loss mask, truncate.

Input is JSONL in OpenAI's ``messages`` format, one conversation per line::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}

Rendering is the ChatML template of :mod:`lmforge.data.chat` (``CHAT_TEMPLATE``, which the Hugging
Face export writes as ``chat_template``): ids are built turn by turn from the special tokens' ids and
the encoded text, never by re-tokenising a rendered string. A user or system turn is exactly what
:func:`~lmforge.data.chat.render_chat` gives at serving time; an assistant turn is the generation
prompt ``<|im_start|>assistant\\n`` (the same ids the server feeds the model) followed by the encoded
content, ``<|im_end|>`` and a newline. The loss mask is 1 on the assistant content and its
``<|im_end|>`` (so the model learns to end its turn) and 0 elsewhere; ``decode(ids)`` equals the Jinja
template's rendering of the same messages.

A model imported with its own chat template (``Tokenizer.chat_template``) is rendered through that
template instead, and the loss falls on each assistant message's tokens and its end of turn as
:func:`lmforge.data.chat.chat_spans` reads them from the template (Llama 3's ``<|eot_id|>``, Gemma's
``<end_of_turn>``, ...); a conversation the template refuses is dropped and counted under its reason.

A conversation longer than ``max_length`` tokens keeps its system turn and as many whole turns from
the start as fit, ending with an assistant turn; one whose first exchange cannot fit is dropped and
counted under its reason. Usage::

    convs, report = read_conversations(["chat.jsonl"], on_bad_line="skip")
    example = encode_conversation(tokenizer, convs[0].messages, max_length=256)
    ids, mask = example.ids, example.mask          # same length; mask[i] == 1: ids[i] is trained on
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.chat import IM_END, ROLES, TemplateRefused, chat_spans, render_chat
from lmforge.data.sources import DataError

EXAMPLES_KEPT = 5  # bad lines quoted in the report, per reason


@dataclass
class Conversation:
    messages: list[dict]
    where: str  # file:line, for messages


@dataclass
class ReadReport:
    """What reading the files found: conversations kept and lines skipped per reason (with examples)."""

    lines: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < EXAMPLES_KEPT:
            self.examples[reason].append(where)

    def as_dict(self) -> dict:
        return {"lines": self.lines, "kept": self.kept, "skipped": dict(self.skipped), "examples": self.examples}


# ------------------------------------------------------------------ reading and checking
def check_messages(record: object) -> tuple[list[dict] | None, str, str]:
    """``(messages, "", "")`` if ``record`` is a valid conversation, else ``(None, reason, detail)``."""
    if not isinstance(record, dict) or "messages" not in record:
        return None, "no messages", "a line must be a JSON object with a 'messages' list"
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        return None, "no messages", "'messages' must be a non-empty list"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return None, "bad message", f"messages[{i}] must be an object with 'role' and 'content'"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return None, "unknown role", f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(content, str) or not content.strip():
            what = "missing" if content is None else "empty" if isinstance(content, str) else "not a string"
            return None, "empty content", f"messages[{i}].content is {what}"
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no assistant turn", "the conversation has no assistant turn, so nothing to learn from"
    return [{"role": m["role"], "content": m["content"]} for m in messages], "", ""


def jsonl_lines(path: Path, what: str, report: ReadReport) -> Iterator[tuple[str, object, str]]:
    """``(file:line, record, "")`` for each non-blank line of a JSONL file (counted in ``report.lines``), or
    ``(file:line, None, why)`` for a line that is not JSON; a missing file is a :class:`DataError` naming it."""
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            report.lines += 1
            try:
                yield f"{path}:{n}", json.loads(line), ""
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", None, f"not valid JSON ({e.msg})"


def bad_line(report: ReadReport, on_bad_line: str, where: str, reason: str, detail: str) -> None:
    """A line that cannot be used: stop naming it (``on_bad_line="stop"``) or count it and go on (``"skip"``)."""
    if on_bad_line == "stop":
        raise DataError(f"{where}: {detail} (finetune.on_bad_line=skip skips such lines)")
    report.skip(reason, where)


def read_conversations(paths: Sequence[str | Path], on_bad_line: str = "stop",
                       report: ReadReport | None = None) -> tuple[list[Conversation], ReadReport]:
    """Every conversation of the JSONL files; a bad line raises :class:`DataError` naming file and line
    (``on_bad_line="stop"``) or is counted in the report and skipped (``"skip"``). Blank lines are ignored."""
    report = report or ReadReport()
    out: list[Conversation] = []
    for raw in paths:
        for where, record, not_json in jsonl_lines(Path(raw), "chat data", report):
            messages, reason, detail = (None, "malformed JSON", not_json) if not_json else check_messages(record)
            if messages is None:
                bad_line(report, on_bad_line, where, reason, detail)
                continue
            report.kept += 1
            out.append(Conversation(messages, where))
    return out, report


# ------------------------------------------------------------------ token ids and loss mask
@dataclass
class Example:
    ids: list[int]
    mask: list[int]  # 1 = this token is a training target
    truncated: bool = False


def encode_turn(tokenizer, message: dict) -> tuple[list[int], list[int]]:
    """Ids and loss mask of one turn (see the module docstring)."""
    if message["role"] != "assistant":
        ids = render_chat(tokenizer, [message], add_generation_prompt=False)
        return ids, [0] * len(ids)
    head = render_chat(tokenizer, [], add_generation_prompt=True)  # <|im_start|>assistant\n
    body = [*tokenizer.encode(message["content"]), tokenizer.token_to_id(IM_END)]
    newline = tokenizer.encode("\n")
    return head + body + newline, [0] * len(head) + [1] * len(body) + [0] * len(newline)


def encode_conversation(tokenizer, messages: Sequence[dict], max_length: int | None = None,
                        loss_on: str = "all_assistant") -> Example | str:
    """The training example of ``messages``, or the reason it cannot be one (a string).

    Turns are added whole while they fit in ``max_length``; the kept part ends at its last assistant
    turn. ``loss_on="last_assistant"`` keeps the loss on the last kept assistant turn only.
    """
    if getattr(tokenizer, "chat_template", None) is not None:
        return _encode_with_template(tokenizer, messages, max_length, loss_on)
    turns = [encode_turn(tokenizer, m) for m in messages]
    ids: list[int] = []
    mask: list[int] = []
    last_assistant = -1
    for i, (t_ids, t_mask) in enumerate(turns):
        if max_length is not None and len(ids) + len(t_ids) > max_length:
            break
        ids, mask = ids + t_ids, mask + t_mask
        if messages[i]["role"] == "assistant":
            last_assistant = i
    if last_assistant < 0:
        return "first exchange longer than max_length"
    truncated = last_assistant + 1 < len(messages)
    keep = sum(len(t[0]) for t in turns[: last_assistant + 1])
    ids, mask = ids[:keep], mask[:keep]
    if loss_on == "last_assistant":
        start = keep - len(turns[last_assistant][0])
        mask = [0] * start + mask[start:]
    return Example(ids, mask, truncated)


def _encode_with_template(tokenizer, messages: Sequence[dict], max_length: int | None,
                          loss_on: str) -> Example | str:
    """:func:`encode_conversation` through the model's own template: its assistant spans carry the loss."""
    try:
        ids, spans = chat_spans(tokenizer, messages)
    except TemplateRefused as e:
        return e.reason
    kept = [s for s in spans if max_length is None or s[1] <= max_length]
    if not kept:
        return "first exchange longer than max_length"
    truncated = len(kept) < len(spans)
    if truncated:
        ids = ids[: kept[-1][1]]  # end with the last assistant turn that fits whole
    elif max_length is not None:
        ids = ids[:max_length]  # only what the template writes after the last turn can be cut
    if loss_on == "last_assistant":
        kept = kept[-1:]
    mask = [0] * len(ids)
    for start, end in kept:
        mask[start:end] = [1] * (end - start)
    return Example(ids, mask, truncated)


def encode_all(tokenizer, conversations: Sequence[Conversation], max_length: int,
               loss_on: str = "all_assistant") -> tuple[list[Example], dict]:
    """Examples of all conversations and the counts: kept, truncated, dropped per reason."""
    examples: list[Example] = []
    dropped: Counter = Counter()
    for conv in conversations:
        ex = encode_conversation(tokenizer, conv.messages, max_length, loss_on)
        if isinstance(ex, str):
            dropped[ex] += 1
            continue
        examples.append(ex)
    stats = {"conversations": len(conversations), "kept": len(examples),
             "truncated": sum(e.truncated for e in examples), "dropped": dict(dropped),
             "tokens": sum(len(e.ids) for e in examples), "target_tokens": sum(sum(e.mask) for e in examples)}
    return examples, stats
