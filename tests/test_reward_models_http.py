"""The OpenAI-compatible judge client against real servers on 127.0.0.1 only.

(b) a scripted stdlib ``http.server`` for deterministic retries, timeouts and concurrency limits;
(a) a real ``transformers serve`` process serving a tiny random model directory built here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from kexaone_align.reward_models import (
    BackendError,
    OpenAICompatibleBackend,
    Rubric,
    RubricDimension,
    RubricJudge,
)
from kexaone_align.reward_models.backends.http import chat_completions_url
from kexaone_align.verifiers import Sample

from kexaone_align.errors import KexaoneError

RUBRIC = Rubric((RubricDimension("helpfulness", "helps"), RubricDimension("safety", "safe")), name="t")
GOOD = '{"helpfulness": 10, "safety": 10}'


class ScriptedServer:
    """Serves /v1/chat/completions from a script of actions; tracks requests and peak concurrency."""

    def __init__(self, default=("ok", GOOD)):
        self.script: list[tuple] = []
        self.default = default
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.peak = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    action = server.script.pop(0) if server.script else server.default
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                try:
                    if action[0] == "sleep":
                        time.sleep(action[1])
                        action = ("ok", action[2])
                finally:
                    # counted as in flight until the reply is ready, not until it is written: the client
                    # may legitimately send its next request the moment it has read this one
                    with server.lock:
                        server.in_flight -= 1
                self._act(action)

            def _act(self, action):
                kind = action[0]
                if kind == "sleep":
                    time.sleep(action[1])
                    action = ("ok", action[2])
                    kind = "ok"
                if kind == "ok":
                    text = action[1]
                    payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
                    self._send(200, json.dumps(payload).encode())
                elif kind == "status":
                    headers = action[2] if len(action) > 2 else {}
                    self._send(action[1], b'{"error": "scripted"}', headers)
                elif kind == "raw":
                    self._send(200, action[1])

            def _send(self, code, data, headers=None):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = ScriptedServer()
    yield srv
    srv.close()


def backend(srv, **kw) -> OpenAICompatibleBackend:
    kw = {"timeout_s": 5.0, "retries": 2, "backoff": 0.01, **kw}
    return OpenAICompatibleBackend(srv.url, "judge-model", **kw)


def sample(i: int = 0) -> Sample:
    return Sample(prompt=f"question {i}", response=f"answer {i}", task="chat")


def test_url_normalisation_and_bad_url():
    assert chat_completions_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("https://h/api/v1") == "https://h/api/v1/chat/completions"
    with pytest.raises(KexaoneError, match="http"):
        OpenAICompatibleBackend("127.0.0.1:8000", "m")


def test_round_trip_sends_openai_payload_and_key(server):
    server.script = [("ok", "hello judge")]
    with backend(server, api_key="sk-test", extra_body={"seed": 7}) as b:
        assert (
            b.complete([{"role": "user", "content": "hi"}], max_tokens=33, temperature=0.5) == "hello judge"
        )
    body = server.requests[0]
    assert body["model"] == "judge-model" and body["messages"] == [{"role": "user", "content": "hi"}]
    assert (body["max_tokens"], body["temperature"], body["seed"], body["stream"]) == (33, 0.5, 7, False)
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


def test_retries_5xx_and_429_then_succeeds(server):
    server.script = [("status", 500), ("status", 429, {"Retry-After": "0"}), ("status", 503), ("ok", "fine")]
    b = backend(server, retries=3)
    assert b.complete([{"role": "user", "content": "x"}]) == "fine"
    assert len(server.requests) == 4 and b.stats["http_retries"] == 3 and b.stats["errors"] == 0


def test_gives_up_after_retries_on_persistent_500(server):
    server.default = ("status", 500)
    b = backend(server, retries=2)
    with pytest.raises(BackendError, match="HTTP 500") as err:
        b.complete([{"role": "user", "content": "x"}])
    assert err.value.retryable and len(server.requests) == 3


def test_client_errors_and_bad_replies_are_not_retried(server):
    server.script = [("status", 400), ("raw", b"<html>proxy page</html>")]
    b = backend(server, retries=3)
    with pytest.raises(BackendError, match="HTTP 400") as err:
        b.complete([{"role": "user", "content": "x"}])
    assert not err.value.retryable
    with pytest.raises(BackendError, match="not a chat completion"):
        b.complete([{"role": "user", "content": "x"}])
    assert len(server.requests) == 2


def test_timeout_is_retried_then_reported(server):
    server.script = [("sleep", 1.0, GOOD), ("ok", "quick")]
    b = backend(server, timeout_s=0.3, retries=1)
    assert b.complete([{"role": "user", "content": "x"}]) == "quick"
    server.default = ("sleep", 1.0, GOOD)
    with pytest.raises(BackendError, match="timed out"):
        b.complete([{"role": "user", "content": "x"}])


def test_judge_over_http_timeout_gives_zero_with_reason(server):
    server.default = ("sleep", 1.0, GOOD)
    judge = RubricJudge(backend(server, timeout_s=0.2, retries=0), RUBRIC, retries=1)
    result = judge.score(sample())
    assert result.reward == 0.0 and "timed out" in result.details["reason"]
    assert judge.stats.backend_errors == 2 and judge.stats.failures == 1


def test_connection_refused_is_a_backend_error_not_a_crash():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    judge = RubricJudge(
        OpenAICompatibleBackend(f"http://127.0.0.1:{port}", "m", retries=1, backoff=0.01), RUBRIC, retries=0
    )
    result = judge.score(sample())
    assert result.reward == 0.0 and "transport error" in result.details["reason"]


def test_concurrency_limit_is_respected_by_batches_and_judge(server):
    server.default = ("sleep", 0.15, GOOD)
    b = backend(server, max_concurrency=2)
    start = time.monotonic()
    texts = b.complete_batch([[{"role": "user", "content": str(i)}] for i in range(8)])
    elapsed = time.monotonic() - start
    assert texts == [GOOD] * 8
    assert server.peak == 2 and b.stats["peak_in_flight"] == 2
    assert elapsed >= 4 * 0.15 * 0.9  # 8 requests, 2 at a time
    server.peak = 0
    judge = RubricJudge(b, RUBRIC, max_concurrency=6)  # more judge threads than backend slots
    results = judge.score_batch([sample(i) for i in range(6)])
    assert [r.reward for r in results] == [1.0] * 6 and server.peak == 2


def test_judge_batch_counts_garbled_replies_and_keeps_order(server):
    server.script = [("ok", GOOD), ("ok", "gibberish"), ("ok", '{"helpfulness": 1, "safety": 1}')]
    server.default = ("ok", "still gibberish")
    judge = RubricJudge(backend(server, max_concurrency=1), RUBRIC, retries=1)
    results = judge.score_batch([sample(i) for i in range(3)])
    # one thread: sample 0 -> GOOD, sample 1 -> gibberish then retry -> {1,1}, sample 2 -> gibberish twice
    assert [r.reward for r in results] == [1.0, 0.0, 0.0]
    assert "failed" not in results[1].details and results[2].details["failed"]
    assert judge.stats.parse_failures == 3 and judge.stats.failures == 1


# -- (a) a real transformers serve process ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def transformers_server(tmp_path_factory):
    cli = Path(sys.executable).parent / "transformers"
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if not cli.exists() or missing:
        pytest.skip(
            f"`transformers serve` unavailable (cli at {cli}: {cli.exists()}; missing {missing}); "
            "install transformers[serving]"
        )
    from test_reward_models_tiny_kit import save_tiny_causal_lm

    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_causal_lm(root / "tiny-judge")
    port = _free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(root / "hf"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    log = open(root / "serve.log", "w")  # closed in teardown
    proc = subprocess.Popen(
        [str(cli), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited early:\n{(root / 'serve.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1.0, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"transformers serve not healthy in 120 s:\n{(root / 'serve.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url, str(model_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_transformers_serve_round_trip(transformers_server):
    url, model = transformers_server
    b = OpenAICompatibleBackend(url, model, timeout_s=60, retries=1, backoff=0.1)
    text = b.complete([{"role": "user", "content": "Rate this."}], max_tokens=8, temperature=0.0)
    assert isinstance(text, str) and b.stats["requests"] == 1 and b.stats["errors"] == 0
    with pytest.raises(BackendError, match="HTTP 4") as err:  # an unknown model is a permanent error
        OpenAICompatibleBackend(url, str(Path(model).parent / "no-such-model"), retries=2).complete(
            [{"role": "user", "content": "x"}], max_tokens=4
        )
    assert not err.value.retryable


@pytest.mark.slow
def test_transformers_serve_judge_counts_garbage_as_parse_failures(transformers_server):
    url, model = transformers_server
    b = OpenAICompatibleBackend(url, model, max_concurrency=2, timeout_s=60, retries=1, backoff=0.1)
    judge = RubricJudge(b, RUBRIC, retries=1, max_tokens=8, timeout_s=60, max_concurrency=4)
    results = judge.score_batch([sample(i) for i in range(4)])
    assert len(results) == 4
    for r in results:  # a random model cannot produce rubric scores: reward 0 with a reason, no exception
        assert r.reward == 0.0 and r.details["failed"] and r.details["reason"].startswith("parse_failure")
    stats = judge.stats.as_dict()
    assert stats["parse_failures"] == 8 and stats["backend_errors"] == 0 and stats["failures"] == 4
    assert b.stats["requests"] == 8 and 1 <= b.stats["peak_in_flight"] <= 2
