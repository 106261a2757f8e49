"""Build the evaluation tasks that ship with lmforge from the embedded Shakespeare corpus.

Writes ``speaker.jsonl``, ``cloze.jsonl`` and ``minimal_pairs.jsonl`` next to this file, with a fixed
seed, so the committed files can be rebuilt and checked byte for byte::

    python -m lmforge.eval.task_files.build           # rewrite the three files
    python -m lmforge.eval.task_files.build --check   # exit 1 if a committed file differs

Expected output: ``speaker: 100 items``, ``cloze: 60 items``, ``minimal_pairs: 100 items``.
The task specs (``*.yaml``) and ``PROVENANCE.md`` beside them say what each task measures.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

from lmforge.config import RunConfig
from lmforge.data.sources import embedded_corpus

HERE = Path(__file__).parent
SEED = 2024
# The works the default config (seed 1337, data.val_fraction 0.1) holds out for validation: a model
# trained with the defaults never saw them, so speaker and minimal-pair items measure generalisation.
HELD_OUT = ("henry_iv_part_1", "merchant_of_venice", "rape_of_lucrece", "tempest")
SPEAKER_PLAYS = ("henry_iv_part_1", "merchant_of_venice", "tempest")
CONTEXT_CHARS = 360  # speaker contexts keep at most this much of the preceding dialogue
_FUNCTION_WORDS = """
    i you he she it we they thou thee thy me him her us them my his our your their is are was were be been am
    do did does have has had will shall would should may might can could must not art hath doth dost and or
    but if so as to of in on at by for with from that this the a an no nor
"""
FUNCTION_WORDS = set(_FUNCTION_WORDS.split())

# (text before the answer, answer): famous lines, each checked to occur in the corpus as written here.
CLOZE = [
    ("To be, or not to be,--that is the", "question"), ("Now is the winter of our", "discontent"),
    ("All the world's a", "stage"), ("If music be the food of", "love"),
    ("But soft! what light through yonder window", "breaks"), ("O Romeo, Romeo! wherefore art thou", "Romeo"),
    ("A horse! a horse! my kingdom for a", "horse"), ("Friends, Romans, countrymen, lend me your", "ears"),
    ("The quality of mercy is not", "strain'd"), ("Shall I compare thee to a summer's", "day"),
    ("Double, double, toil and", "trouble"), ("Is this a dagger which I see before", "me"),
    ("Out, damned", "spot"), ("parting is such sweet", "sorrow"), ("that which we call a", "rose"),
    ("Something is rotten in the state of", "Denmark"), ("brevity is the soul of", "wit"), ("Et tu,", "Brute"),
    ("let slip the dogs of", "war"), ("We are such stuff As dreams are made", "on"), ("O brave new", "world"),
    ("Uneasy lies the head that wears a", "crown"), ("Once more unto the breach, dear friends, once", "more"),
    ("We few, we happy few, we band of", "brothers"), ("The course of true love never did run", "smooth"),
    ("Lord, what fools these mortals", "be"), ("All that glisters is not", "gold"),
    ("Neither a borrower nor a lender", "be"), ("Frailty, thy name is", "woman"),
    ("Alas, poor Yorick!--I knew him,", "Horatio"), ("The better part of valour is", "discretion"),
    ("If you prick us, do we not", "bleed"), ("To-morrow, and to-morrow, and", "to-morrow"),
    ("Life's but a walking", "shadow"), ("Out, out, brief", "candle"),
    ("This royal throne of kings, this scepter'd", "isle"), ("The fault, dear Brutus, is not in our", "stars"),
    ("Love looks not with the eyes, but with the", "mind"), ("More sinn'd against than", "sinning"),
    ("To have a thankless", "child"), ("Men at some time are masters of their", "fates"),
    ("Cowards die many times before their", "deaths"), ("Now cracks a noble", "heart"),
    ("Exit, pursued by a", "bear"), ("Beware the Ides of", "March"), ("Get thee to a", "nunnery"),
    ("Than are dreamt of in your", "philosophy"),
    ("the play's the thing Wherein I'll catch the conscience of the", "king"),
    ("A plague o' both your", "houses"), ("Let me not to the marriage of true", "minds"),
    ("Some Cupid kills with arrows, some with", "traps"), ("what's done cannot be", "undone"),
    ("There's daggers in men's", "smiles"), ("The robb'd that smiles steals something from the", "thief"),
    ("Hell is empty, And all the devils are", "here"), ("misery acquaints a man with strange", "bed-fellows"),
    ("Fair is foul, and foul is", "fair"), ("Full fathom five thy father", "lies"),
    ("The devil can cite Scripture for his", "purpose"), ("The wheel is come full", "circle"),
]


def _blocks(text: str) -> list[list[str]]:
    """Paragraphs: runs of non-blank lines."""
    return [b.splitlines() for b in re.split(r"\n\s*\n", text) if b.strip()]


def _speech(block: list[str]) -> str | None:
    """The speaker tag if ``block`` is a speech (a tag line such as ``PORTIA.`` then text), else None."""
    tag = block[0].strip()
    if len(block) < 2 or len(tag) > 25 or not tag.endswith(".") or tag != tag.upper():
        return None
    if not re.search(r"[A-Z]", tag) or tag.startswith(("ACT ", "SCENE")):
        return None
    return tag


def build_speaker(docs: dict[str, str], rng: random.Random, per_play: int = 34) -> list[dict]:
    items: list[dict] = []
    for play in SPEAKER_PLAYS:
        blocks = _blocks(docs[play])
        tags = [_speech(b) for b in blocks]
        counts: dict[str, int] = {}
        for t in tags:
            if t:
                counts[t] = counts.get(t, 0) + 1
        cast = sorted(t for t, n in counts.items() if n >= 10)  # distractors: the play's main speakers
        # Speech k with speeches k-1 and k-2 right before it (no scene heading or stage direction between).
        candidates = [k for k in range(2, len(blocks)) if all(tags[j] for j in (k - 2, k - 1, k))
                      and tags[k] in cast and len(blocks[k][1].strip()) >= 15]
        for k in sorted(rng.sample(candidates, per_play)):
            context = "\n".join(blocks[k - 2]) + "\n\n" + "\n".join(blocks[k - 1]) + "\n\n"
            if len(context) > CONTEXT_CHARS:  # keep the end, from a line start
                cut = context.find("\n", len(context) - CONTEXT_CHARS) + 1
                context = context[cut:].lstrip("\n")
            gold = tags[k]
            options = [gold, *rng.sample([t for t in cast if t != gold], 3)]
            rng.shuffle(options)
            line = blocks[k][1].strip()
            items.append({"id": f"{play}-{k}", "context": context, "choices": [f"{t}\n{line}" for t in options],
                          "label": options.index(gold)})
    return items[:100]


def build_cloze(docs: dict[str, str]) -> list[dict]:
    items = []
    for prefix, answer in CLOZE:
        pattern = r"\s+".join(re.escape(w) for w in prefix.split()) + r"(\s+)" + re.escape(answer)
        hits = [(doc_id, m) for doc_id, text in docs.items() for m in [re.search(pattern, text)] if m]
        if not hits:
            raise SystemExit(f"cloze: '{prefix} {answer}' does not occur in the corpus")
        doc_id, m = hits[0]
        text = docs[doc_id]
        # Context: the line before the phrase's line as well, so the model knows where it is.
        line_start = text.rfind("\n", 0, m.start()) + 1
        start = text.rfind("\n", 0, max(0, line_start - 1)) + 1
        items.append({"id": f"{doc_id}-{m.start()}", "prompt": text[start:m.start(1)], "answers": [answer]})
    return items


def build_minimal_pairs(docs: dict[str, str], rng: random.Random, per_work: int = 25) -> list[dict]:
    items = []
    for work in HELD_OUT:
        pairs = []  # (previous line, line, index of the first swapped word)
        for block in _blocks(docs[work]):
            body = block[1:] if _speech(block) else block
            for prev, line in zip([None, *body[:-1]], body, strict=True):
                words = line.split()
                if not 6 <= len(words) <= 14 or line.lstrip().startswith("["):
                    continue
                spots = [i for i in range(1, len(words) - 1)
                         if words[i].isalpha() and words[i + 1].isalpha()
                         and words[i].lower() != words[i + 1].lower()
                         and not {words[i].lower(), words[i + 1].lower()} <= FUNCTION_WORDS]
                if spots:
                    pairs.append((prev, line.strip(), rng.choice(spots)))
        for prev, line, i in rng.sample(pairs, per_work):
            words = line.split()
            words[i], words[i + 1] = words[i + 1], words[i]
            options = [line, " ".join(words)]
            label = rng.randrange(2)
            if label:
                options.reverse()
            context = f"{prev.strip()}\n" if prev and prev.strip() else ""
            items.append({"id": f"{work}-{len(items)}", "context": context, "choices": options, "label": label})
    return items


def build() -> dict[str, list[dict]]:
    from lmforge.data.split import _choose_val_docs

    docs = {d.id: d.text for d in embedded_corpus()}
    ids = list(docs)  # the corpus order, as the docs stage reads it
    held = {ids[i] for i in _choose_val_docs(ids, RunConfig())}
    if held != set(HELD_OUT):
        raise SystemExit(f"the default config now holds out {sorted(held)}, not {list(HELD_OUT)}: update HELD_OUT")
    return {"speaker": build_speaker(docs, random.Random(SEED)), "cloze": build_cloze(docs),
            "minimal_pairs": build_minimal_pairs(docs, random.Random(SEED + 1))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args(argv)
    status = 0
    for name, items in build().items():
        text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
        path = HERE / f"{name}.jsonl"
        if args.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            print(f"{name}: {len(items)} items, {'identical' if same else 'DIFFERS from ' + str(path)}")
            status |= not same
        else:
            path.write_text(text, encoding="utf-8")
            print(f"{name}: {len(items)} items")
    return status


if __name__ == "__main__":
    sys.exit(main())
