"""The one HTTP client for OpenAI-compatible servers: API key, timeouts and retries in one place.

The chat engine, the embedder and the transcriber all reach their ``/v1`` servers through
`OpenAIClient`, so they send the same bearer header and ride out the same transient failures
(refused or dropped connections, 429 and 5xx answers). It hands back the server's last answer,
error statuses included: what a 400 or a 404 means is for the caller to say.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, NamedTuple

import httpx

from .errors import EngineError

log = logging.getLogger(__name__)

# A server may ask for a long pause; waiting longer than this is worse than failing.
_MAX_RETRY_AFTER_S = 30.0
_CONNECT_TIMEOUT_S = 10.0


class Reply(NamedTuple):
    """A server's answer and the seconds it took to come (the last attempt only)."""

    response: httpx.Response
    seconds: float


class OpenAIClient:
    """Requests to one OpenAI-compatible server, shared by every thread of its user.

    `base_url` ends in ``/v1``; paths are relative to it, and an absolute URL is sent as is (vLLM
    serves ``/tokenize`` at its root). `api_key` defaults to ``$OPENAI_API_KEY``; without one no
    Authorization header is sent. Connection failures, 429 and 5xx answers are retried `retries`
    times, waiting `backoff_s` doubled each time, or longer when the server's Retry-After asks.
    A request that timed out waiting for its answer is not retried: the server may still be
    working on it, and sending it again would only add to that work.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 900.0,
        retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        timeout = httpx.Timeout(timeout_s, connect=min(_CONNECT_TIMEOUT_S, timeout_s))
        self._client = httpx.Client(headers=headers, timeout=timeout)

    def url(self, path: str) -> str:
        """The full URL of `path`: below `base_url`, unless it is a URL already."""
        return path if "://" in path else f"{self.base_url}/{path.lstrip('/')}"

    def get_json(self, path: str, *, retries: int | None = None) -> Reply:
        return self._send("GET", path, retries)

    def post_json(self, path: str, body: Mapping[str, Any], *, retries: int | None = None) -> Reply:
        return self._send("POST", path, retries, json=body)

    def post_multipart(
        self,
        path: str,
        files: Mapping[str, tuple[str, bytes, str]],
        fields: Mapping[str, str],
        *,
        retries: int | None = None,
    ) -> Reply:
        """A form upload; `files` maps each field to (file name, content, media type)."""
        return self._send("POST", path, retries, files=dict(files), data=dict(fields))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAIClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    def _send(self, method: str, path: str, retries: int | None, **content: Any) -> Reply:
        """The server's last answer; EngineError when none came."""
        url = self.url(path)
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            last = attempt == retries
            start = time.perf_counter()
            try:
                response = self._client.request(method, url, **content)
            except httpx.TransportError as e:
                if _retryable(e) and not last:
                    self._pause(attempt, None, f"{method} {url}: {type(e).__name__}")
                    continue
                raise self._failure(method, url, e) from e
            if last or not _transient(response.status_code):
                return Reply(response, time.perf_counter() - start)
            self._pause(attempt, response, f"{method} {url}: HTTP {response.status_code}")
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _pause(self, attempt: int, response: httpx.Response | None, what: str) -> None:
        wait = self.backoff_s * 2**attempt
        if response is not None:
            wait = max(wait, _retry_after(response))
        log.info("%s; retrying in %.2fs", what, wait)
        time.sleep(wait)

    def _failure(self, method: str, url: str, e: httpx.TransportError) -> EngineError:
        cause = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if not _retryable(e):
            return EngineError(
                f"{method} {url} failed: no answer within {self.timeout_s:g}s ({cause}); "
                "a long prefill or upload may need a larger timeout_s"
            )
        if isinstance(e, httpx.TimeoutException):
            return EngineError(f"{method} {url} failed: cannot connect ({cause})")
        return EngineError(f"{method} {url} failed: cannot reach the server ({cause}); is it running?")


def _retryable(e: httpx.TransportError) -> bool:
    """Every transport failure but a timeout waiting for the answer, which the server may still be
    working on: a refused, reset or dropped connection, or a connect or pool timeout."""
    return not isinstance(e, httpx.TimeoutException) or isinstance(
        e, httpx.ConnectTimeout | httpx.PoolTimeout
    )


def _transient(status: int) -> bool:
    """Statuses that say "try again later": rate limits and server-side failures."""
    return status == 429 or status >= 500


def _retry_after(response: httpx.Response) -> float:
    """The server's Retry-After in seconds (capped), or 0 when absent or given as a date."""
    try:
        return min(float(response.headers.get("Retry-After", 0)), _MAX_RETRY_AFTER_S)
    except ValueError:
        return 0.0
