"""Ask a served lmforge model a question, with or without a context passage, through the OpenAI client.

Start a server first (``lmforge serve runs/demo``), then::

    python examples/ask.py "Who is Juliet's cousin?"
    python examples/ask.py --passage-file scene.txt "Who kills Tybalt?"
    echo "Tybalt is slain by Romeo." | python examples/ask.py --passage - "Who kills Tybalt?"
    python examples/ask.py --style completion --passage-file scene.txt "Who kills Tybalt?"

``--style chat`` (default) sends the passage and question as chat messages: right
for a model fine-tuned on conversations. ``--style completion`` writes them as one
plain-text prompt ending in ``Answer:`` and stops at the end of the line: right for
a base model, which continues text rather than following turns. The answer streams
to stdout. Needs the ``openai`` package.
"""

from __future__ import annotations

import argparse
import os
import sys

SYSTEM = "Answer briefly. If a passage is given, answer from it."


def chat_messages(question: str, passage: str | None) -> list[dict[str, str]]:
    """The conversation for a question, with the passage (if any) placed before it in the user turn."""
    user = question if not passage else f"Passage:\n{passage.strip()}\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def completion_prompt(question: str, passage: str | None) -> str:
    """A plain-text prompt a base model can continue: passage, question, then 'Answer:'."""
    head = f"{passage.strip()}\n\n" if passage else ""
    return f"{head}Question: {question}\nAnswer:"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("question", help="the question to ask")
    ap.add_argument("--passage", help="a context passage to answer from ('-' reads it from stdin)")
    ap.add_argument("--passage-file", help="read the context passage from this file")
    ap.add_argument("--style", choices=("chat", "completion"), default="chat",
                    help="chat messages (fine-tuned chat models) or a plain prompt (base models)")
    ap.add_argument("--base-url", default=os.environ.get("LMFORGE_BASE_URL", "http://127.0.0.1:8000/v1"),
                    help="the server's OpenAI base URL (env LMFORGE_BASE_URL)")
    ap.add_argument("--api-key", default=os.environ.get("LMFORGE_API_KEY", "none"),
                    help="API key if the server requires one (env LMFORGE_API_KEY)")
    ap.add_argument("--model", help="model id (default: the first one the server lists)")
    ap.add_argument("--max-tokens", type=int, default=100, help="longest answer in tokens")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = the most likely answer")
    args = ap.parse_args()

    from openai import OpenAI

    passage = args.passage
    if passage == "-":
        passage = sys.stdin.read()
    if args.passage_file:
        with open(args.passage_file, encoding="utf-8") as f:
            passage = f.read()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    model = args.model or client.models.list().data[0].id
    if args.style == "chat":
        stream = client.chat.completions.create(model=model, messages=chat_messages(args.question, passage),
                                                max_tokens=args.max_tokens, temperature=args.temperature,
                                                stream=True)
        pieces = (chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    else:
        stream = client.completions.create(model=model, prompt=completion_prompt(args.question, passage),
                                           max_tokens=args.max_tokens, temperature=args.temperature,
                                           stop=["\n"], stream=True)
        pieces = (chunk.choices[0].text for chunk in stream if chunk.choices)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
