"""``lmforge chat RUN``: a multi-turn chat with a model in the terminal.

Each user line becomes a user turn; the whole conversation so far is rendered with the chat template
(:func:`~lmforge.data.chat.render_chat`) and the reply is streamed by the one generator
(:class:`~lmforge.serve.engine.Engine`) with the ``sample`` section's settings, stopping at
the model's end tokens (``<|im_end|>``, ``<|endoftext|>``). ``/reset`` starts a new conversation,
``/exit`` (or end of input) quits. It reads piped input too, so it can be scripted::

    lmforge chat runs/demo                       # the fine-tuned model when the run has one
    printf 'Who speaks the line "..."?\\n/exit\\n' | lmforge chat runs/demo --sample.temperature=0

``RUN`` is a run folder (its fine-tuned model, else its pre-trained one: the rule of
:func:`lmforge.trained.run_model_path`, the same for ``serve`` and ``generate``), a checkpoint, an
export or a Hugging Face folder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from lmforge.config import RunConfig
from lmforge.data.chat import render_chat
from lmforge.serve.engine import Engine
from lmforge.serve.sample import params_from

COMMANDS = "/reset = new conversation, /exit = quit"


def main(cfg: RunConfig, path: str, stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[dict]:
    """Run the chat until /exit or end of input; returns the last conversation's messages."""
    from lmforge.trained import load_model  # it imports the model code: only when a chat starts

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tm = load_model(Path(path))
    engine = Engine(tm.model, tm.tokenizer, device=None)
    params = params_from(cfg.sample)
    interactive = stdin.isatty()
    stdout.write(f"chatting with {tm.path} (step {tm.step}); {COMMANDS}\n")
    messages: list[dict] = []
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            messages = []
            stdout.write("(new conversation)\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        prompt = render_chat(tm.tokenizer, messages, add_generation_prompt=True)
        stdout.write("model> ")
        reply = []
        for piece in engine.stream(prompt, params):
            reply.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply).strip() or "..."})
    return messages
