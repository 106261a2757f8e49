"""The OpenAI-compatible API with the real ``openai`` client against a live server on 127.0.0.1.

Run: ``.venv/bin/pytest tests/serve/test_serve_api.py``. One server (a tiny Transformer run)
serves every test here: completions, chat, streaming, logprobs with echo, stop
strings, n > 1, seeds, health, models and metrics.
"""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from lmforge.trained import load_model
from tests.serving import CONTEXT, make_run, server_for, sse_events


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(run):
    s = server_for(run)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)


def greedy(**kw) -> dict:
    return {"temperature": 0, "max_tokens": 24, **kw}


def test_completion_matches_the_engine(client, server, run):
    r = client.completions.create(model=server.model_name, prompt="ROMEO:", **greedy())
    tm = load_model(run)
    from lmforge.serve.engine import Engine, SamplingParams

    [c] = Engine(tm.model, tm.tokenizer).generate(["ROMEO:"], SamplingParams(temperature=0, max_new_tokens=24))
    assert r.choices[0].text == c.text and r.choices[0].finish_reason == c.finish_reason
    # The begin token counts: it is what the model was given (vLLM counts it too).
    assert r.usage.prompt_tokens == len(tm.tokenizer.encode("ROMEO:")) + 1
    assert r.usage.completion_tokens == c.completion_tokens
    assert r.object == "text_completion" and r.model == server.model_name


def test_prompt_forms_and_n(client, server, run):
    tok = load_model(run).tokenizer
    ids = tok.encode("To be")
    as_text = client.completions.create(model=server.model_name, prompt="To be", **greedy())
    as_ids = client.completions.create(model=server.model_name, prompt=ids, **greedy())
    assert as_ids.choices[0].text == as_text.choices[0].text
    both = client.completions.create(model=server.model_name, prompt=["To be", "ROMEO:"], n=3, temperature=1.0,
                                     seed=3, max_tokens=10)
    assert [c.index for c in both.choices] == list(range(6))
    assert len({c.text for c in both.choices[:3]}) > 1  # the n samples differ
    batch_ids = client.completions.create(model=server.model_name, prompt=[ids, ids], **greedy())
    assert [c.text for c in batch_ids.choices] == [as_text.choices[0].text] * 2


def test_seed_reproduces(client, server):
    kw = {"model": server.model_name, "prompt": "Once", "temperature": 1.0, "max_tokens": 20}
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b and a != c


def test_stop_strings_cut_the_text(client, server):
    full = client.completions.create(model=server.model_name, prompt="KING:", stop=None,
                                     **greedy(max_tokens=30)).choices[0].text
    k = next(i for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    stop = full[k:k + 2]
    cut = client.completions.create(model=server.model_name, prompt="KING:", stop=[stop, "\x00never"],
                                    **greedy(max_tokens=30)).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"


def test_echo_logprobs_score_the_prompt(client, server, run):
    """What lm-evaluation-harness asks: prompt token ids, echo, logprobs, max_tokens 0 or 1.

    A scored prompt starts a new document: the server puts the begin token first (Tokenizer.with_bos) without
    echoing it, so every prompt token, the first included, has its log-probability after that token."""
    tm = load_model(run)
    ids = tm.tokenizer.encode("Shall I compare thee to a summer's day?")
    seen = [tm.tokenizer.bos_id, *ids]
    with torch.no_grad():
        logp = torch.log_softmax(tm.model(torch.tensor([seen]))[0][0], -1)  # (T+1, V): row i predicts seen[i+1]
    expected = [logp[i, seen[i + 1]].item() for i in range(len(ids))]
    for max_tokens in (0, 1):
        r = client.completions.create(model=server.model_name, prompt=ids, echo=True, logprobs=1,
                                      max_tokens=max_tokens, temperature=0)
        lp = r.choices[0].logprobs
        assert len(lp.tokens) == len(ids) + max_tokens
        assert lp.token_logprobs[:len(ids)] == pytest.approx(expected, abs=1e-4)
        assert r.choices[0].text.startswith(tm.tokenizer.decode(ids))
        assert lp.text_offset[:3] == [0, len(tm.tokenizer.decode(ids[:1])), len(tm.tokenizer.decode(ids[:2]))]
        for i in range(len(ids)):  # top-1 alternative: the argmax, with its log-probability
            [(text, value)] = lp.top_logprobs[i].items()
            assert value == pytest.approx(logp[i].max().item(), abs=1e-4)
    gen = r.choices[0].logprobs
    assert gen.token_logprobs[-1] == pytest.approx(logp[-1].max().item(), abs=1e-4)  # greedy continuation
    streamed = [c.choices[0] for c in client.completions.create(
        model=server.model_name, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0, stream=True)]
    assert "".join(c.text for c in streamed) == r.choices[0].text
    assert [x for c in streamed for x in c.logprobs.token_logprobs] == pytest.approx(gen.token_logprobs, abs=1e-6)
    # A prompt that already starts with the begin token is scored as sent: echoed whole, the token not doubled.
    r = client.completions.create(model=server.model_name, prompt=seen, echo=True, logprobs=1, max_tokens=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(seen) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)


def test_streaming_completion_equals_plain(client, server):
    plain = client.completions.create(model=server.model_name, prompt="Hark", **greedy())
    stream = client.completions.create(model=server.model_name, prompt="Hark", stream=True,
                                       stream_options={"include_usage": True}, **greedy())
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_plain_and_streaming(client, server):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who is Romeo?"}]
    r = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0, max_tokens=20,
                                       logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    stream = client.chat.completions.create(model=server.model_name, messages=messages, temperature=0,
                                            max_tokens=20, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_default_max_tokens_fill_the_context(client, server):
    r = client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "Hi"}],
                                       temperature=0, extra_body={"ignore_eos": True, "stop_token_ids": []})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT and r.choices[0].finish_reason == "length"


def test_models_health_metrics(client, server):
    [m] = client.models.list().data
    assert m.id == server.model_name and m.model_extra["max_model_len"] == CONTEXT
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    httpx.post(f"{server.base_url}/completions", content=b"not json")
    text = httpx.get(f"{server.url}/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['lmforge_http_responses_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert samples['lmforge_errors_total{status="400"}'] >= 1
    assert samples["lmforge_requests_running"] == 0 and samples["lmforge_requests_waiting"] == 0
    assert samples["lmforge_generation_tokens_total"] > 0 and samples["lmforge_prompt_tokens_total"] > 0
    assert samples['lmforge_request_latency_seconds_count{endpoint="/v1/completions"}'] >= 1


def test_raw_sse_format(server):
    body = {"prompt": "A", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = sse_events(raw.split("\n\n"))
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])


def test_ask_example_with_and_without_a_passage(client, server):
    """examples/ask.py prints what the API answers for the same question (greedy, so it is reproducible)."""
    import importlib.util
    import subprocess
    import sys

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location("ask", ROOT / "examples" / "ask.py")
    ask = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ask)
    passage, question = "Tybalt is her cousin.", "Who is Tybalt?"
    expected_chat = client.chat.completions.create(model=server.model_name, max_tokens=8, temperature=0,
                                                   messages=ask.chat_messages(question, passage))
    expected_plain = client.completions.create(model=server.model_name, max_tokens=8, temperature=0, stop=["\n"],
                                               prompt=ask.completion_prompt(question, None))
    base = [sys.executable, str(ROOT / "examples" / "ask.py"), "--base-url", server.base_url, "--max-tokens", "8"]
    chat = subprocess.run([*base, "--passage", "-", question], input=passage, capture_output=True, text=True,
                          timeout=120)
    plain = subprocess.run([*base, "--style", "completion", question], capture_output=True, text=True, timeout=120)
    assert chat.returncode == 0 and plain.returncode == 0, chat.stderr + plain.stderr
    assert chat.stdout == expected_chat.choices[0].message.content + "\n"
    assert plain.stdout == expected_plain.choices[0].text + "\n"


def test_lm_evaluation_harness_reads_the_scores(server, run):
    """lm-evaluation-harness's own parser (local-completions) on our echo + logprobs answers."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from lmforge.serve.engine import Engine, SamplingParams

    tm = load_model(run)
    ctx, cont = tm.tokenizer.encode("To be, or not"), tm.tokenizer.encode(" to be")
    bos = tm.tokenizer.bos_id  # the server scores the prompt after the begin token, as lmforge's own scoring does
    [greedy] = Engine(tm.model, tm.tokenizer).generate([[bos, *ctx]], SamplingParams(
        temperature=0, max_new_tokens=3, stop_token_ids=[]))
    with torch.no_grad():
        logp = torch.log_softmax(tm.model(torch.tensor([[bos, *ctx, *cont]]))[0][0], -1)
    expected = sum(logp[len(ctx) + i, t].item() for i, t in enumerate(cont))
    for tokens, want_greedy in ((ctx + cont, None), (ctx + greedy.token_ids, True)):
        payload = {"model": server.model_name, "prompt": [tokens], "temperature": 0, "max_tokens": 1,
                   "logprobs": 1, "seed": 1234, "echo": True}  # what local-completions sends for loglikelihood
        out = httpx.post(f"{server.base_url}/completions", json=payload).json()
        [(total, is_greedy)] = LocalCompletionsAPI.parse_logprobs(out, [tokens], [len(ctx)])
        if want_greedy:
            assert is_greedy
        else:
            assert total == pytest.approx(expected, abs=1e-4)
            assert is_greedy == all(logp[len(ctx) + i].argmax().item() == t for i, t in enumerate(cont))


def test_serve_command(run, tmp_path):
    """`lmforge serve RUN` in its own process: serves on 127.0.0.1, takes the key from LMFORGE_API_KEY."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LMFORGE_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run), f"--serve.port={port}",
                             "--serve.model_name=bard"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for the process to listen (start-up imports take a few seconds)
            assert proc.poll() is None, proc.communicate()[1]
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        assert health.json() == {"status": "ok"}
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k3y"}).json()
        assert models["data"][0]["id"] == "bard" and models["data"][0]["max_model_len"] == CONTEXT
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn shuts down cleanly, then re-raises the signal
