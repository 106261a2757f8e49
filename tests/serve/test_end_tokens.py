"""End tokens and special tokens in generated text, and which model a run folder means.

Run: ``.venv/bin/pytest tests/serve/test_end_tokens.py``. The "chat model" here is a bigram table over
a real run's tokenizer (which holds ``<|im_end|>`` and ``<|endoftext|>``): after the prompt it
spells a fixed reply and then emits an end token over and over, as a chat fine-tune does at the
end of its turn. Every way of generating (completions, chat, streaming, ``lmforge generate``,
``lmforge chat``) must stop there with ``finish_reason`` "stop" and no special token in the text.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from lmforge.config import ServeConfig, TokenizerConfig, load_config
from lmforge.data.chat import IM_END
from lmforge.data.tokenizer import EOT, Tokenizer, train_tokenizer
from lmforge.serve.background import BackgroundServer
from lmforge.serve.engine import Engine, SamplingParams
from lmforge.trained import load_model
from tests.serve.test_engine import TinyLM
from tests.serving import CONTEXT, make_run, server_for, sse_events

REPLY = " I am Romeo."  # its tokens must be distinct: each one predicts the next


def chain_model(vocab: int, chain: list[int]) -> TinyLM:
    """Greedy decoding after any prompt spells ``chain`` (distinct ids), then repeats its last id forever."""
    assert len(set(chain)) == len(chain)
    table = torch.zeros(vocab, vocab)
    table[:, chain[0]] = 10.0  # any token not in the chain (the prompt's last) starts it
    for a, b in zip(chain, chain[1:] + chain[-1:], strict=True):
        table[a, b] = 50.0
    return TinyLM(table=table)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("ends"))


@pytest.fixture(scope="module")
def tok(run) -> Tokenizer:
    return load_model(run).tokenizer


def reply_ids(tok: Tokenizer) -> list[int]:
    return tok.encode(REPLY)


def test_end_ids_hold_end_of_text_and_end_of_turn(tok):
    assert tok.end_ids == sorted({tok.token_to_id(EOT), tok.token_to_id(IM_END)})
    ids = [*reply_ids(tok), tok.token_to_id(IM_END)]
    assert tok.decode(ids) == REPLY + IM_END  # rendered when asked: decode is encode's inverse
    assert tok.decode(ids, skip_special_tokens=True) == REPLY


@pytest.mark.parametrize("end", [IM_END, EOT])
def test_every_endpoint_stops_at_each_end_token(run, tok, end):
    end_id = tok.token_to_id(end)
    model = chain_model(tok.vocab_size, [*reply_ids(tok), end_id])
    server = server_for(run, model=model)
    try:
        url = server.base_url
        body = {"prompt": "ROMEO:", "max_tokens": 40, "temperature": 0}
        plain = httpx.post(f"{url}/completions", json=body, timeout=60).json()["choices"][0]
        assert (plain["text"], plain["finish_reason"]) == (REPLY, "stop")
        events = sse_events(httpx.post(f"{url}/completions", json={**body, "stream": True}, timeout=60)
                            .text.split("\n\n"))
        chunks = [e["choices"][0] for e in events if e != "[DONE]"]
        assert "".join(c["text"] for c in chunks) == REPLY and chunks[-1]["finish_reason"] == "stop"
        chat = {"messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 40, "temperature": 0}
        answer = httpx.post(f"{url}/chat/completions", json=chat, timeout=60).json()["choices"][0]
        assert (answer["message"]["content"], answer["finish_reason"]) == (REPLY, "stop")
        events = sse_events(httpx.post(f"{url}/chat/completions", json={**chat, "stream": True}, timeout=60)
                            .text.split("\n\n"))
        chunks = [e["choices"][0] for e in events if e != "[DONE]"]
        assert "".join(c["delta"].get("content", "") for c in chunks) == REPLY
        assert chunks[-1]["finish_reason"] == "stop"
        # Asked to run past the end token: the ids are generated, their text only when asked for.
        past = {**body, "max_tokens": len(reply_ids(tok)) + 3, "ignore_eos": True}
        hidden = httpx.post(f"{url}/completions", json=past, timeout=60).json()["choices"][0]
        shown = httpx.post(f"{url}/completions", json={**past, "skip_special_tokens": False},
                           timeout=60).json()["choices"][0]
        assert (hidden["text"], hidden["finish_reason"]) == (REPLY, "length")
        assert shown["text"] == REPLY + end * 3
    finally:
        server.stop()


def test_generate_and_chat_verbs_stop_at_the_end_of_turn(run, tok, monkeypatch):
    from lmforge import trained
    from lmforge.serve import sample
    from lmforge.serve.repl import main as chat
    from lmforge.serve.sample import generate_cli

    tm = load_model(run)
    tm.model = chain_model(tok.vocab_size, [*reply_ids(tok), tok.token_to_id(IM_END)])
    for where in (trained, sample):  # chat imports load_model when it starts, generate at module level
        monkeypatch.setattr(where, "load_model", lambda path, device="cpu": tm)
    cfg = load_config(None, ["sample.temperature=0", "sample.max_new_tokens=40", "sample.prompts=['ROMEO:']"])
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    generate_cli(str(run), cfg)
    assert out.getvalue() == "ROMEO:" + REPLY + "\n\n"
    said = io.StringIO()
    messages = chat(cfg, str(run), stdin=io.StringIO("Who are you?\n/exit\n"), stdout=said)
    assert messages[-1] == {"role": "assistant", "content": REPLY.strip()}
    assert said.getvalue().endswith(f"model> {REPLY}\n")


def test_stream_holds_back_bytes_of_an_unfinished_character():
    """lmforge's char tokenizer spells an unseen character in byte tokens; its decoder replaces every byte of
    an unfinished run, so a stream must hold the whole run back until the character is complete."""
    tok = train_tokenizer(TokenizerConfig(kind="char"), ["hello world"])
    text = "hé😀 ok"
    ids = tok.encode(text)
    engine = Engine(chain_model(tok.vocab_size, [*ids, tok.eot_id]), tok)
    params = SamplingParams(temperature=0, max_new_tokens=40)
    deltas = list(engine.stream("w", params))
    [c] = engine.generate(["w"], params)
    assert (c.text, c.finish_reason) == (text, "stop")
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)


def test_hf_import_keeps_every_declared_end_token(tmp_path):
    from tests.trained.test_hf_import import build

    folder = tmp_path / "llama"
    build("llama", folder)
    config = json.loads((folder / "generation_config.json").read_text())
    eos = config["eos_token_id"]
    turn = eos + 1  # a second end token, as Llama 3 declares <|eot_id|> beside <|end_of_text|>
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [eos, turn]}))
    tm = load_model(folder)
    assert {eos, turn} <= set(tm.tokenizer.end_ids)
    tm.tokenizer.save(tmp_path / "saved")  # as a fine-tuning run keeps it
    assert Tokenizer.load(tmp_path / "saved").end_ids == tm.tokenizer.end_ids


def finetuned_copy(run: Path, dest: Path) -> Path:
    """``run`` with a fine-tuning checkpoint (a copy of its pre-trained one) under finetune/ckpt."""
    shutil.copytree(run, dest)
    shutil.copytree(dest / "train" / "ckpt", dest / "finetune" / "ckpt")
    return dest


def test_a_run_folder_means_the_same_model_for_serve_chat_generate_and_harness(run, tmp_path):
    from lmforge.cli import verb_help
    from lmforge.serve.repl import main as chat

    both = finetuned_copy(run, tmp_path / "both")
    tuned, pre = load_model(both), load_model(both / "train")
    assert tuned.path == both / "finetune" / "ckpt" / "step_000000" and tuned.name == "tiny-transformer-finetune"
    assert pre.path == both / "train" / "ckpt" / "step_000000" and pre.name == "tiny-transformer"
    assert load_model(run).name == "tiny-transformer"  # no fine-tuning: the pre-trained model
    with BackgroundServer.for_model(both, ServeConfig()) as server:
        [card] = httpx.get(f"{server.base_url}/models", timeout=30).json()["data"]
    assert card["id"] == "tiny-transformer-finetune" and card["max_model_len"] == CONTEXT
    said = io.StringIO()
    chat(load_config(None, ["sample.max_new_tokens=1"]), str(both), stdin=io.StringIO("/exit\n"), stdout=said)
    assert said.getvalue().startswith(f"chatting with {tuned.path} ")
    from lmforge.eval.harness import LmforgeLM
    from lmforge.trained import PATH_RULE

    assert LmforgeLM(pretrained=str(both), device="cpu").trained.path == tuned.path  # lmforge harness RUN
    for verb in ("serve", "chat", "generate", "harness", "eval", "export", "finetune"):
        assert PATH_RULE in verb_help(verb)


def test_hf_export_generation_config_stops_and_bounds_generation(run, tmp_path):
    from transformers import GenerationConfig

    from lmforge.export.hf import export_hf

    tm = load_model(run)
    export_hf(tm, tmp_path / "hf")
    gen = GenerationConfig.from_pretrained(tmp_path / "hf")
    assert gen.max_length == CONTEXT
    assert sorted(gen.eos_token_id) == tm.tokenizer.end_ids
