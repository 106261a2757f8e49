"""The server's error matrix, queueing and cancellation, against live servers on 127.0.0.1.

Run: ``.venv/bin/pytest tests/serve/test_serve_errors.py``. Every error must come back as
``{"error": {"message", "type", "param", "code"}}`` with the right status, never a 5xx
for a client's mistake; a full queue answers 429 with Retry-After; a client that
disconnects frees its batch slot; a model failure after a stream began arrives as an
error event followed by ``[DONE]``.
"""

from __future__ import annotations

import json
import socket
import threading

import httpx
import openai
import pytest

from lmforge.models.rnn import GRUModel
from lmforge.trained import load_model
from tests.serving import CONTEXT, assert_error, make_run, server_for, sse_events


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-errors")
    return {"transformer": make_run(root), "gru": make_run(root, "gru")}


@pytest.fixture(scope="module")
def server(runs):
    s = server_for(runs["transformer"], api_key="sesame", max_body_bytes=4096, max_batch=8)
    yield s
    s.stop()


def post(server, path: str, body: dict | bytes, key: str | None = "sesame") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(server.base_url + path, content=body, headers={**headers, "Content-Type": "application/json"})
    return httpx.post(server.base_url + path, json=body, headers=headers)


@pytest.mark.parametrize("body,param,fragment", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "JSON object"),
    ({"max_tokens": 4}, "prompt", "prompt"),
    ({"prompt": "a", "temperature": "hot"}, "temperature", "temperature"),
    ({"prompt": "a", "temperature": 3}, "temperature", "temperature"),
    ({"prompt": "a", "n": 0}, "n", "n"),
    ({"prompt": "a", "max_tokens": -1}, "max_tokens", "max_tokens"),
    ({"prompt": "a", "logprobs": 50}, "logprobs", "logprobs"),
    ({"prompt": "a", "stop": [""]}, "stop", "stop"),
    ({"prompt": [], "max_tokens": 2}, "prompt", "empty"),
    ({"prompt": [5, 100000]}, "prompt", "100000"),
    ({"prompt": "a", "logit_bias": {"5": 1.0}}, "logit_bias", "logit_bias"),
    ({"prompt": "a", "best_of": 3}, "best_of", "best_of"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "echo"),
    ({"prompt": "a", "n": 9}, "n", "serve.max_batch"),
    ({"prompt": "a", "seed": 2**70}, "seed", "seed"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
])
def test_bad_completion_requests_are_400(server, body, param, fragment):
    error = assert_error(post(server, "/completions", body), 400, param)
    assert fragment in error["message"] and error["type"] == "BadRequestError"


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
])
def test_bad_chat_requests_are_400(server, body, param):
    assert_error(post(server, "/chat/completions", body), 400, param)


def test_context_overflow_names_the_counts(server):
    error = assert_error(post(server, "/completions", {"prompt": [7] * 100, "max_tokens": 40}), 400, "max_tokens")
    assert f"maximum context length is {CONTEXT} tokens" in error["message"]
    # The begin token the server puts first counts (Tokenizer.with_bos): 100 ids sent are 101 in the model.
    assert "141 tokens (101 in the prompt, 40 for the completion)" in error["message"]
    error = assert_error(post(server, "/completions", {"prompt": [7] * 200, "max_tokens": 1}), 400, "prompt")
    assert "201 in the prompt" in error["message"]
    chat = {"messages": [{"role": "user", "content": "word " * 200}], "max_tokens": 5}
    assert "in the messages" in assert_error(post(server, "/chat/completions", chat), 400)["message"]


def test_unknown_model_path_and_method(server):
    error = assert_error(post(server, "/completions", {"model": "gpt-9", "prompt": "a"}), 404, "model")
    assert error["type"] == "NotFoundError" and "gpt-9" in error["message"]
    assert_error(httpx.get(server.url + "/v1/nothing-here"), 404)
    assert_error(httpx.get(server.base_url + "/completions"), 405)


def test_api_key(server):
    assert_error(post(server, "/completions", {"prompt": "a"}, key=None), 401)
    assert_error(post(server, "/completions", {"prompt": "a"}, key="wrong"), 401)
    assert_error(httpx.get(server.base_url + "/models"), 401)
    assert post(server, "/completions", {"prompt": "a", "max_tokens": 2}).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()


def test_body_size_limit(server):
    error = assert_error(post(server, "/completions", {"prompt": "x" * 5000}), 413)
    assert "4096" in error["message"]


def test_queue_full_is_429_and_a_disconnect_frees_the_slot(runs):
    """One slot, one waiting place: a third request is refused; closing the first lets the second run."""
    server = server_for(runs["gru"], max_batch=1, max_waiting=1)  # a GRU has no context limit: A runs until closed
    sched = server.app.state.scheduler
    endless = {"prompt": "A", "max_tokens": 10**6, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", server.base_url + "/completions", json=endless, timeout=30) as a:
            lines = a.iter_lines()  # kept alive: a dropped iterator would close the response
            next(lines)  # A is decoding
            b_status: list[int] = []
            b = threading.Thread(target=lambda: b_status.append(
                httpx.post(server.base_url + "/completions", json={"prompt": "B", "max_tokens": 3}, timeout=30)
                .status_code))
            b.start()
            assert sched.wait_until(lambda: sched.waiting == 1, timeout=10)
            c = httpx.post(server.base_url + "/completions", json={"prompt": "C", "max_tokens": 3})
            error = assert_error(c, 429)
            assert error["type"] == "RateLimitError" and int(c.headers["Retry-After"]) >= 1
        b.join(30)  # leaving the `with` closed A's connection: its slot went to B
        assert b_status == [200]
        assert sched.wait_until(lambda: sched.running == 0 and sched.waiting == 0 and not sched.batch.rows, 10)
    finally:
        server.stop()


def test_non_streaming_client_that_disconnects_frees_its_slot(runs):
    server = server_for(runs["gru"], max_batch=2)
    sched = server.app.state.scheduler
    body = json.dumps({"prompt": "A", "max_tokens": 10**6, "ignore_eos": True}).encode()
    try:
        with socket.create_connection((server.host, server.port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert sched.wait_until(lambda: sched.running == 1, timeout=10)
        assert sched.wait_until(lambda: sched.running == 0 and not sched.batch.rows, timeout=10)
    finally:
        server.stop()


class FailingGRU(GRUModel):
    """A GRU whose ``step`` raises on one chosen call: a model failure in the middle of a stream."""

    fail_on: int | None = None
    calls = 0

    def step(self, idx, state):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated device failure")
        return super().step(idx, state)


def test_error_after_streaming_began_is_an_event_then_done(runs):
    tm = load_model(runs["gru"])
    model = FailingGRU(tm.cfg.model)
    model.load_state_dict(tm.model.state_dict())
    server = server_for(runs["gru"], model=model)
    try:
        model.fail_on = model.calls + 4  # prefill, two decode steps, then the failure
        body = {"prompt": "A", "max_tokens": 50, "ignore_eos": True, "stream": True, "temperature": 0, "logprobs": 0}
        with httpx.stream("POST", server.base_url + "/completions", json=body) as r:
            assert r.status_code == 200
            events = sse_events(list(r.iter_lines()))
        assert events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert error["code"] == 500 and "simulated device failure" in error["message"]
        assert all("choices" in e for e in events[:-2])
        streamed = sum(len(e["choices"][0]["logprobs"]["tokens"]) for e in events[:-2])
        assert streamed <= 2  # the tokens picked before the failing step; the one picked with it never left
        with pytest.raises(openai.APIError, match="simulated"):  # the openai client raises on the event
            model.fail_on = model.calls + 3
            client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
            list(client.completions.create(model=server.model_name, stream=True, **{
                k: v for k, v in body.items() if k not in ("stream", "ignore_eos")}, extra_body={"ignore_eos": True}))
        ok = httpx.post(server.base_url + "/completions", json={"prompt": "A", "max_tokens": 5, "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5  # still serving
        metrics = httpx.get(server.url + "/metrics").text
        assert 'lmforge_errors_total{status="500"} 2.0' in metrics
    finally:
        server.stop()
