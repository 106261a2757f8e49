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
pairs the true next line of the speech (chosen) with a wrong one (rejected) of five kinds in turn
(:data:`PAIR_KINDS`): the true line with its words shuffled, another line of the same play, a line of
another play, the prompt's own line repeated, the true line without its last word. The last two
are what a language model tends to prefer (copying from its context; a shorter answer), so they are
what tuning has to correct. Its lines are none of those the chat set uses, and the held-out pairs share
no line (asked, chosen or rejected) with the tuning pairs::

    shakespeare_pairs_train.jsonl    {prompt, chosen, rejected, kind} to tune on
    shakespeare_pairs_val.jsonl      pairs for the validation loss and reward accuracy
    shakespeare_pairs_heldout.jsonl  pairs scored before and after tuning (accuracy per kind too)
    shakespeare_pairs_manifest.json  pairs of each kind per file, candidate lines dropped and why

Rebuild or check the committed files (byte for byte)::

    python -m lmforge.finetune.build_set           # rewrite the files
    python -m lmforge.finetune.build_set --check   # exit 1 if a committed file differs

Expected output: ``heldout: 200 items``, ``val: 100 conversations``, ``train: 1200 conversations``,
``pairs_heldout: 200 pairs``, ``pairs_val: 100 pairs``, ``pairs_train: 1200 pairs`` and the
train kinds (240 each).
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
# The rejected answer of a preference pair, by kind. The first three are wrong lines a language model
# already tends to rank below the true one; the last two are the failures it tends to prefer (copying
# its prompt; stopping early, since a shorter answer has fewer tokens to pay for), as real preference
# data corrects a model's own habits.
PAIR_KINDS = {"shuffled": "the true next line with its words shuffled",
              "same_play": "another line of the same play",
              "other_play": "a line of another play",
              "repeat": "the prompt's own line again",
              "cut": "the true next line without its last word"}
KINDS = tuple(PAIR_KINDS)
MANIFEST = "shakespeare_pairs_manifest.json"


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


def build() -> tuple[dict[str, list[dict]], dict]:
    """Every file's records by split, and the preference set's manifest."""
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
    pairs, manifest = _pairs([it for it in rest[pos:] if it["line"] not in used and it["answer"] not in used])
    return {**out, **pairs}, manifest


def _shuffled(rng: random.Random, line: str) -> str:
    words = line.split()
    for _ in range(10):  # a shuffle that changes the order (lines of 5+ words)
        rng.shuffle(words)
        if " ".join(words) != line:
            break
    return " ".join(words)


def _rejected(rng: random.Random, kind: str, it: dict, pool: dict[str, list[str]]) -> str:
    """The wrong answer of one kind (see PAIR_KINDS) for a "continue" item."""
    if kind == "shuffled":
        return _shuffled(rng, it["answer"])
    if kind == "repeat":
        return it["line"]
    if kind == "cut":
        # A true prefix (its tokens are the chosen's), one word short: cut any shorter and the missing words
        # cost so many nats that no gentle tuning makes the whole line the more likely.
        return it["answer"][: [m.end() for m in re.finditer(r"\S+", it["answer"])][-2]]
    play = it["play"] if kind == "same_play" else rng.choice(sorted(p for p in pool if p != it["play"]))
    return rng.choice([ln for ln in pool[play] if ln not in (it["line"], it["answer"])])


def _make_pairs(rng: random.Random, items: list[dict], pool: dict[str, list[str]]) -> list[dict]:
    """One pair per item, the kinds in turn so that every split holds each kind equally."""
    out = []
    for i, it in enumerate(items):
        kind = KINDS[i % len(KINDS)]
        out.append({"prompt": _question(it), "chosen": it["answer"], "rejected": _rejected(rng, kind, it, pool),
                    "kind": kind})
    return out


def _pairs(items: list[dict]) -> tuple[dict[str, list[dict]], dict]:
    """Preference pairs from unused "continue" items, and the set's manifest (kinds per split, drops).

    The held-out pairs share no line with the tuning pairs: not the prompt's line, the chosen line nor a
    rejected one, so what tuning teaches has to carry over to lines it never saw."""
    rng = random.Random(PAIRS_SEED)
    unique, seen, dropped = [], set(), {"line already asked": 0, "next line repeats the line": 0,
                                        "shares a line with the held-out pairs": 0}
    for it in (it for it in items if it["kind"] == "continue"):
        reason = "line already asked" if it["line"] in seen else \
            "next line repeats the line" if it["line"] == it["answer"] else None
        if reason:
            dropped[reason] += 1
            continue
        seen.add(it["line"])
        unique.append(it)
    held = unique[:N_HELDOUT]
    held_text = {t for it in held for t in (it["line"], it["answer"])}
    tuning = []
    for n, it in enumerate(unique[N_HELDOUT:]):
        if len(tuning) == N_VAL + N_TRAIN:
            dropped["not needed (the set is full)"] = len(unique) - N_HELDOUT - n
            break
        if it["line"] in held_text or it["answer"] in held_text:
            dropped["shares a line with the held-out pairs"] += 1
        else:
            tuning.append(it)
    tuning_text = {t for it in tuning for t in (it["line"], it["answer"])}
    by_play: dict[str, dict[str, None]] = {}  # wrong lines to draw from, by play (none the chat set uses)
    for it in items:
        by_play.setdefault(it["play"], {})[it["line"]] = None
    lines = {play: list(v) for play, v in by_play.items()}
    held_pairs = _make_pairs(rng, held, {p: [ln for ln in v if ln not in tuning_text] for p, v in lines.items()})
    held_text |= {p["rejected"] for p in held_pairs}
    tuning_pairs = _make_pairs(rng, tuning, {p: [ln for ln in v if ln not in held_text] for p, v in lines.items()})
    out = {"pairs_heldout": held_pairs, "pairs_val": tuning_pairs[:N_VAL], "pairs_train": tuning_pairs[N_VAL:]}
    manifest = {"seed": PAIRS_SEED, "kinds": {split: {k: sum(p["kind"] == k for p in pairs) for k in KINDS}
                                              for split, pairs in out.items()},
                "dropped": dropped, "kinds_meaning": PAIR_KINDS}
    return out, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args(argv)
    HERE.mkdir(exist_ok=True)
    sets, manifest = build()
    status = 0
    for split, records in sets.items():
        path = HERE / (f"shakespeare_{split}.jsonl" if split.startswith("pairs") else f"shakespeare_qa_{split}.jsonl")
        unit = "items" if split == "heldout" else "pairs" if split.startswith("pairs") else "conversations"
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        status |= _write_or_check(path, text, args.check, f"{split}: {len(records)} {unit}")
    kinds = ", ".join(f"{k} {n}" for k, n in manifest["kinds"]["pairs_train"].items())
    return status | _write_or_check(HERE / MANIFEST, json.dumps(manifest, indent=1) + "\n", args.check,
                                    f"pairs_manifest: train kinds {kinds}")


def _write_or_check(path: Path, text: str, check: bool, written: str) -> int:
    """Write ``path`` (printing ``written``), or with ``check`` compare it byte for byte: 1 if it differs."""
    if not check:
        path.write_text(text, encoding="utf-8")
        print(written)
        return 0
    same = path.is_file() and path.read_text(encoding="utf-8") == text
    print(f"{written.split(':')[0]}: {'ok' if same else 'DIFFERS'} ({path})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
