"""Build the embedded chat fine-tuning set and the preference set from the embedded Shakespeare corpus.

Questions about the plays, answered from the text itself, as conversations in OpenAI ``messages``
format: which play has a line, who speaks it, and how it continues. A quarter of the conversations
carry a system turn and about a third hold two exchanges (multi-turn). Items are split by item with a
fixed seed into three files beside this one, in ``sets/``::

    shakespeare_qa_train.jsonl     conversations to fine-tune on
    shakespeare_qa_val.jsonl       conversations for the validation loss
    shakespeare_qa_heldout.jsonl   the held-out task: multiple choice {messages, choices, label}, lines
                                   never seen in fine-tuning; 4 choices (chance 25%)

The preference set (``finetune.mode=dpo|simpo``) asks to continue a line, as the chat set does, and
pairs the true next line of the speech (chosen) with a wrong one (rejected): half the time the true
line with its words shuffled, half the time another line of the same play. Its lines are none of those
the chat set uses, so a model fine-tuned on the chat set has not seen them::

    shakespeare_pairs_train.jsonl    {prompt, chosen, rejected} to tune on
    shakespeare_pairs_val.jsonl      pairs for the validation loss and reward accuracy
    shakespeare_pairs_heldout.jsonl  pairs scored before and after tuning

Rebuild or check the committed files (byte for byte)::

    python -m lmforge.finetune.build_set           # rewrite the three files
    python -m lmforge.finetune.build_set --check   # exit 1 if a committed file differs

Expected output: ``heldout: 200 items``, ``val: 100 conversations``, ``train: 1200 conversations``,
``pairs_train: 1200 pairs``, ``pairs_val: 100 pairs``, ``pairs_heldout: 200 pairs``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from lmforge.data.sources import embedded_corpus

HERE = Path(__file__).parent / "sets"
SEED = 2026
N_TRAIN, N_VAL, N_HELDOUT = 1200, 100, 200
PAIRS_SEED = 2027  # its own stream: the chat files do not change when the preference set does
SYSTEM = "You know the plays of Shakespeare well. Answer briefly."
MIN_SPEECHES = 200  # works with at least this many speeches are plays (the poems and sonnets have none)


def _title(raw: str) -> str:
    small = {"of", "and", "the", "a", "or", "on", "by", "for", "to", "in", "at"}
    words = raw.replace(";", ",").split()  # whole titles: the two parts of Henry IV differ only after the comma
    def word(i: int, w: str) -> str:
        if re.fullmatch(r"[IVX]+,?", w):  # regnal numbers stay as they are: Richard III
            return w
        return w.lower() if i and w.lower() in small else w.capitalize()

    return " ".join(word(i, w) for i, w in enumerate(words))


def _speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker tag without its period, lines) for every block that is a speech."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.strip().splitlines()]
        if len(lines) < 2:
            continue
        tag = lines[0]
        # "PROSPERO." in most plays; "Laer." or "Lady Capulet." in a few (Hamlet, Romeo and Juliet, ...).
        if len(tag) > 25 or not re.fullmatch(r"[A-Z][A-Za-z']*(?: [A-Za-z']+){0,3}\.", tag) \
                or tag.upper().startswith(("ACT ", "SCENE")):
            continue
        out.append((tag[:-1], lines[1:]))
    return out


def _good(line: str) -> bool:
    words = line.split()
    return 5 <= len(words) <= 12 and not line.startswith("[") and not re.search(r"\b(Enter|Exit|Exeunt)\b", line)


def _items(docs: list) -> list[dict]:
    """Every candidate question: {play, kind, line, answer, choices (distractor pool)}."""
    plays = {}
    for doc in docs:
        speeches = _speeches(doc.text)
        if len(speeches) >= MIN_SPEECHES:
            plays[doc.id] = (_title(doc.meta["title"]), speeches)
    titles = sorted(t for t, _ in plays.values())
    items = []
    for play in sorted(plays):
        title, speeches = plays[play]
        counts: dict[str, int] = {}
        for tag, _ in speeches:
            counts[tag] = counts.get(tag, 0) + 1
        cast = sorted(t for t, n in counts.items() if n >= 15 and t == t.upper())  # main speakers: distractors
        for tag, lines in speeches:
            for i, line in enumerate(lines):
                if not _good(line):
                    continue
                items.append({"play": play, "kind": "play", "line": line, "title": title, "answer": title,
                              "pool": [t for t in titles if t != title]})
                if tag in cast and len(cast) >= 4:  # (mixed-case tags are often abbreviations: no such questions)
                    items.append({"play": play, "kind": "speaker", "line": line, "title": title, "answer": tag,
                                  "pool": [t for t in cast if t != tag]})
                if i + 1 < len(lines) and _good(lines[i + 1]):
                    items.append({"play": play, "kind": "continue", "line": line, "title": title,
                                  "answer": lines[i + 1], "pool": []})
    return items


def _question(it: dict) -> str:
    if it["kind"] == "play":
        return f'Which play has the line "{it["line"]}"?'
    if it["kind"] == "speaker":
        return f'In {it["title"]}, who speaks the line "{it["line"]}"?'
    return f'Continue this line from {it["title"]}: "{it["line"]}"'


def _reply(it: dict) -> str:
    return it["answer"] if it["kind"] == "continue" else f"{it['answer']}."


def _conversation(rng: random.Random, group: list[dict]) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.25 else []
    for it in group:
        messages += [{"role": "user", "content": _question(it)}, {"role": "assistant", "content": _reply(it)}]
    return {"messages": messages}


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    items = _items(list(embedded_corpus()))
    rng.shuffle(items)
    # Held-out task: which play / who speaks, with 4 choices; its lines are kept out of fine-tuning.
    heldout_items = [it for it in items if it["kind"] in ("play", "speaker")][:N_HELDOUT]
    held_lines = {it["line"] for it in heldout_items}
    rest = [it for it in items if it["line"] not in held_lines]
    heldout = []
    for it in heldout_items:
        options = [it["answer"], *rng.sample(it["pool"], 3)]
        rng.shuffle(options)
        heldout.append({"id": f"{it['play']}-{it['kind']}-{len(heldout)}", "messages": [
            {"role": "user", "content": _question(it)}], "choices": [f"{o}." for o in options],
            "label": options.index(it["answer"])})
    out: dict[str, list[dict]] = {"heldout": heldout}
    pos = 0
    for split, n in (("val", N_VAL), ("train", N_TRAIN)):
        convs = []
        while len(convs) < n:
            size = 2 if rng.random() < 0.3 else 1
            convs.append(_conversation(rng, rest[pos:pos + size]))
            pos += size
        out[split] = convs
    used = held_lines | {t for it in rest[:pos] for t in (it["line"], it["answer"])}
    out.update(_pairs([it for it in rest[pos:] if it["line"] not in used and it["answer"] not in used]))
    return out


def _pairs(items: list[dict]) -> dict[str, list[dict]]:
    """Preference pairs from unused "continue" items: the true next line against a wrong one."""
    rng = random.Random(PAIRS_SEED)
    by_play: dict[str, list[str]] = {}
    for it in items:
        by_play.setdefault(it["play"], []).append(it["line"])
    pairs, seen = [], set()
    for it in (it for it in items if it["kind"] == "continue"):
        if it["line"] in seen or len(pairs) == N_TRAIN + N_VAL + N_HELDOUT:
            continue
        seen.add(it["line"])
        words = it["answer"].split()
        if rng.random() < 0.5:
            for _ in range(10):  # a shuffle that changes the order (lines of 5+ words)
                rng.shuffle(words)
                if " ".join(words) != it["answer"]:
                    break
            rejected = " ".join(words)
        else:
            rejected = rng.choice([ln for ln in by_play[it["play"]] if ln not in (it["line"], it["answer"])])
        pairs.append({"prompt": _question(it), "chosen": it["answer"], "rejected": rejected})
    return {"pairs_heldout": pairs[:N_HELDOUT], "pairs_val": pairs[N_HELDOUT: N_HELDOUT + N_VAL],
            "pairs_train": pairs[N_HELDOUT + N_VAL:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args(argv)
    HERE.mkdir(exist_ok=True)
    status = 0
    for split, records in build().items():
        path = HERE / (f"shakespeare_{split}.jsonl" if split.startswith("pairs") else f"shakespeare_qa_{split}.jsonl")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            status |= 0 if same else 1
            print(f"{split}: {'ok' if same else 'DIFFERS'} ({path})")
        else:
            path.write_text(text, encoding="utf-8")
            unit = "items" if split == "heldout" else "pairs" if split.startswith("pairs") else "conversations"
            print(f"{split}: {len(records)} {unit}")
    return status


if __name__ == "__main__":
    sys.exit(main())
