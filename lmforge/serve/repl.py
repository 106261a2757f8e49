"""``lmforge chat RUN``: a multi-turn chat with a model in the terminal.

Each user line becomes a user turn; the whole conversation so far is rendered with the chat template
(:func:`~lmforge.serve.chat.render_chat`) and the reply is streamed by the one generator
(:class:`~lmforge.serve.engine.Engine`) with the ``sample`` section's settings, stopping at
``<|im_end|>``. ``/reset`` starts a new conversation, ``/exit`` (or end of input) quits. It reads
piped input too, so it can be scripted::

    lmforge chat runs/demo                       # the fine-tuned model when the run has one
    printf 'Who speaks the line "..."?\\n/exit\\n' | lmforge chat runs/demo --sample.temperature=0

``RUN`` is a run folder (its fine-tuned model, else its pre-trained one), a checkpoint, an export
or a Hugging Face folder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from lmforge.config import RunConfig
from lmforge.serve.chat import chat_stop_ids, render_chat
from lmforge.serve.engine import Engine, SamplingParams

COMMANDS = "/reset = new conversation, /exit = quit"


def resolve_model(path: str):
    """The fine-tuned model of a run folder when it has one, else whatever ``load_any`` opens."""
    from lmforge.export.native import load_any
    from lmforge.train.checkpoint import Checkpointer
    from lmforge.trained import TrainedModel

    p = Path(path)
    if Checkpointer(p / "finetune" / "ckpt").list():
        return TrainedModel.load(p / "finetune")
    return load_any(p)


def main(cfg: RunConfig, path: str, stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[dict]:
    """Run the chat until /exit or end of input; returns the last conversation's messages."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tm = resolve_model(path)
    engine = Engine(tm.model, tm.tokenizer, device=None)
    sc = cfg.sample
    params = SamplingParams(max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_k=sc.top_k,
                            top_p=sc.top_p, seed=sc.seed, stop=list(sc.stop),
                            stop_token_ids=chat_stop_ids(tm.tokenizer))
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
