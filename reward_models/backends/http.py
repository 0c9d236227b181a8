"""A judge served behind any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, SGLang,
``transformers serve``, hosted APIs).

Why this shape: reward scoring fans many requests out from a few threads, so the client caps requests in
flight (``max_concurrency``: a semaphore plus the same connection-pool limit) to avoid overloading a shared
judge server, and retries what is transient -- connection errors, timeouts, 408/429/5xx -- with exponential
backoff (honouring ``Retry-After``). Anything else (400 unknown model, 401 bad key) fails at once with the
server's message. ``timeout_s`` bounds connecting and each wait for bytes; ``RubricJudge`` adds a hard
wall-clock limit per judgement on top.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
from kexaone_align.reward_models.backends.base import BackendError, Messages, complete_each

from kexaone_align.errors import KexaoneError

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


def chat_completions_url(base_url: str) -> str:
    """``http://h:8000`` -> ``http://h:8000/v1/chat/completions``; a path given is kept as the API root."""
    url = base_url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise KexaoneError(
            f"judge base_url {base_url!r} must be an http(s) URL such as http://127.0.0.1:8000/v1"
        )
    if url.endswith("/chat/completions"):
        return url
    if parts.path in ("", "/"):
        url += "/v1"
    return url + "/chat/completions"


class OpenAICompatibleBackend:
    """Chat completions over HTTP with a concurrency cap, retries and backoff. Thread-safe."""

    batched = False

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        extra_body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise KexaoneError(f"judge max_concurrency must be >= 1, got {max_concurrency}")
        if retries < 0 or backoff < 0 or timeout_s <= 0:
            raise KexaoneError("judge retries and backoff must be >= 0 and timeout_s > 0")
        if not model:
            raise KexaoneError("the judge backend needs a model name (as the server lists it in /v1/models)")
        self.url = chat_completions_url(base_url)
        self.model = model
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.extra_body = dict(extra_body or {})
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:
            all_headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=all_headers,
            timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0)),
            limits=httpx.Limits(
                max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency
            ),
            trust_env=False,  # never route a loopback/cluster judge through an environment proxy
        )
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._lock = threading.Lock()
        self._in_flight = 0
        self.stats: dict[str, int] = {"requests": 0, "http_retries": 0, "errors": 0, "peak_in_flight": 0}

    # -- public -----------------------------------------------------------------------------------------
    def complete(self, messages: Messages, *, max_tokens: int = 512, temperature: float = 0.0) -> str:
        """The assistant text for ``messages``; raises ``BackendError`` once retries are spent."""
        payload = {
            **self.extra_body,
            "model": self.model,
            "messages": messages,
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            "stream": False,
        }
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("http_retries")
            try:
                response = self._post(payload)
            except httpx.TimeoutException as exc:
                last = f"timed out after {self.timeout_s:g}s ({type(exc).__name__})"
                delay = self._delay(attempt, None)
            except httpx.TransportError as exc:
                last = f"transport error: {type(exc).__name__}: {exc}"
                delay = self._delay(attempt, None)
            else:
                if response.status_code == 200:
                    return self._content(response)
                last = f"HTTP {response.status_code}: {response.text[:300]}"
                if response.status_code not in RETRY_STATUS:
                    self._count("errors")
                    raise BackendError(f"judge request to {self.url} failed: {last}", retryable=False)
                delay = self._delay(attempt, response.headers.get("retry-after"))
            if attempt < self.retries:
                time.sleep(delay)
        self._count("errors")
        raise BackendError(f"judge request to {self.url} failed after {self.retries + 1} attempt(s): {last}")

    def complete_batch(
        self, batch: Sequence[Messages], *, max_tokens: int = 512, temperature: float = 0.0
    ) -> list[str | Exception]:
        """Texts for many chats, at most ``max_concurrency`` in flight; failures come back in place."""
        if not batch:
            return []

        def one(messages: Messages) -> str | Exception:
            return complete_each(self, [messages], max_tokens=max_tokens, temperature=temperature)[0]

        with ThreadPoolExecutor(
            min(self.max_concurrency, len(batch)), thread_name_prefix="judge-http"
        ) as pool:
            return list(pool.map(one, batch))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAICompatibleBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"OpenAICompatibleBackend({self.url!r}, model={self.model!r}, "
            f"max_concurrency={self.max_concurrency})"
        )

    # -- internals --------------------------------------------------------------------------------------
    def _post(self, payload: dict[str, Any]) -> httpx.Response:
        with self._slots:
            with self._lock:
                self._in_flight += 1
                self.stats["requests"] += 1
                self.stats["peak_in_flight"] = max(self.stats["peak_in_flight"], self._in_flight)
            try:
                return self._client.post(self.url, json=payload)
            finally:
                with self._lock:
                    self._in_flight -= 1

    def _content(self, response: httpx.Response) -> str:
        try:
            message = response.json()["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            self._count("errors")
            raise BackendError(
                f"judge server at {self.url} sent a reply that is not a chat completion: "
                f"{response.text[:300]!r}",
                retryable=False,
            ) from None
        content = message.get("content") if isinstance(message, dict) else None
        return content if isinstance(content, str) else ""

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                pass
        base = min(self.max_backoff, self.backoff * (2**attempt))
        return base * (1.0 + 0.1 * random.random())  # a little jitter so retry storms spread out

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1
