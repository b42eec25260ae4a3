r"""The OpenAI-compatible chat engine: the LM reader over HTTP (vLLM, SGLang or any ``/v1`` server).

Spec: ``openai:<base_url>[#<model>]``, e.g. ``openai:http://127.0.0.1:8000/v1#Kimi-Linear-48B-A3B-Instruct``.
Without ``#<model>`` the first model listed by ``GET <base_url>/models`` is used.

The seed's full-scale configuration, the one choice we run (vLLM on 4 GPUs, 262k context):

    vllm serve moonshotai/Kimi-Linear-48B-A3B-Instruct --tensor-parallel-size 4 --max-model-len 262144 \
        --trust-remote-code --enable-prefix-caching --enable-prompt-tokens-details
    client spec: openai:http://127.0.0.1:8000/v1#moonshotai/Kimi-Linear-48B-A3B-Instruct

Over HTTP our state snapshots become the server's prefix cache. The messages go out exactly as
`Prompt.messages()` builds them, so the memory is a byte-identical prefix across reads of one memory;
the server reports its hits as ``usage.prompt_tokens_details.cached_tokens`` (vLLM only with
``--enable-prompt-tokens-details``), which become `Generation.cached`.

Token counts come from the ``/tokenize`` route that vLLM and SGLang serve at the server root (the base
URL without ``/v1``). It is tried once; a server without it gives None counts from then on. Counts are
cached by the sha256 of the text, so each memory version is tokenised once.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx

from .. import _spec
from .._http import OpenAIClient
from ..errors import BadInput, ContextOverflow, EngineError, ModelUnavailable
from .base import Generation, Prompt, strip_think

log = logging.getLogger(__name__)

SPEC_EXAMPLE = _spec.ENDPOINT_EXAMPLE

_COUNT_CACHE_SIZE = 1024

# How servers say "the prompt does not fit": vLLM, SGLang, OpenAI, llama.cpp, Together, xAI.
_OVERFLOW = re.compile(
    r"context length|context window|context size|maximum model length|maximum prompt length"
    r"|context_length_exceeded|exceed_context_size|prompt is too long|input is too long",
    re.IGNORECASE,
)
_LIMIT = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"maximum context length (?:is |of )?\(?(\d+)",
        r"maximum model length (?:is |of )?\(?(\d+)",
        r"maximum prompt length (?:is |of )?\(?(\d+)",
        r"context length \((\d+)",
    )
]
# Counts that already include the completion the request asked for.
_TOTAL = [
    re.compile(p, re.IGNORECASE)
    for p in (r"you requested (\d+) tokens", r"requested a total of (\d+) tokens")
]
# Counts of the prompt alone; the request needs `max_tokens` more.
_INPUT = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"request has (\d+) input tokens",
        r"messages resulted in (\d+) tokens",
        r"request contains (\d+) tokens",
        r"input \((\d+) tokens",
        r"input length \(?(\d+)",
        r"prompt \(length (\d+)",
    )
]


class OpenAIEngine:
    """Greedy chat completions from an OpenAI-compatible server; stateless here, prefix-cached there.

    `base_url` ends in ``/v1`` (as for the OpenAI SDK). `api_key` defaults to ``$OPENAI_API_KEY``;
    no Authorization header is sent without one. `timeout_s` bounds the wait for an answer and is
    long because a 262k-token prefill takes minutes. Connection failures, 429 and 5xx answers are
    retried `retries` times with exponential backoff from `backoff_s`; a timed-out request is not,
    since the server may still be working on it. Constructing the engine asks ``GET /models`` once
    for the model (when none is given) and its ``max_model_len`` (when `context_length` is not given).
    One `OpenAIClient` (see linmem._http) serves every thread.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        context_length: int | None = None,
        timeout_s: float = 900.0,
        retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        self.base_url = _spec.base_url(base_url)
        self.server_root = self.base_url.removesuffix("/v1")
        self._http = OpenAIClient(
            self.base_url, api_key=api_key, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s
        )
        self._count_lock = threading.Lock()
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._tokenize_ok: bool | None = None

        entry: dict[str, Any] | None = None
        if not model:
            entry = self._first_model()
            model = str(entry["id"])
        elif context_length is None:
            entry = next((e for e in self._models(strict=False) if e.get("id") == model), None)
        if context_length is None and entry is not None:
            context_length = _as_int(entry.get("max_model_len"))
        self.model: str = model
        self.context_length: int | None = context_length
        self.id: str = f"openai:{model}@{self.base_url}"

    @classmethod
    def from_spec(cls, target: str, **options: Any) -> OpenAIEngine:
        """Build from what follows ``openai:`` in a model spec: ``URL`` or ``URL#MODEL``."""
        url, model = _spec.endpoint(target, need_model=False)
        return cls(url, model, **options)

    def generate(self, prompt: Prompt, *, max_new_tokens: int) -> Generation:
        gen = self._complete(prompt.messages(), max_new_tokens, temperature=0)
        return replace(gen, memory_tokens=self._count(prompt.memory_text))

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        until: Callable[[str], bool] | None = None,
    ) -> Generation:
        """A multi-turn chat, sent as is (a content may be a list of parts, images included). A
        sampled request (`temperature` > 0) carries `seed`, which vLLM and SGLang honour per request.
        `until` cuts the reply at the shortest prefix for which it holds: the text a local engine
        stopping there would give (the server still generated the rest)."""
        if temperature < 0:
            raise BadInput(f"temperature must be >= 0, found {temperature!r}")
        gen = self._complete(messages, max_new_tokens, temperature, seed if temperature > 0 else None)
        if until is not None:
            gen = replace(gen, text=_cut(gen.text, until))
        return gen

    def _complete(
        self, messages: list[dict[str, Any]], max_new_tokens: int, temperature: float, seed: int | None = None
    ) -> Generation:
        url = f"{self.base_url}/chat/completions"
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_new_tokens,
            "stream": False,
        }
        if seed is not None:
            body["seed"] = seed
        resp, seconds = self._http.post_json(url, body)
        if resp.is_error:
            raise self._chat_error(resp, url, max_new_tokens)
        data = _json(resp, url)
        try:
            message = data["choices"][0]["message"]
            usage = data["usage"]
            prompt_tokens = int(usage["prompt_tokens"])
            generated = int(usage.get("completion_tokens") or 0)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise EngineError(f"POST {url}: unexpected answer, no {e} in {str(data)[:300]}") from e
        cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        return Generation(
            text=strip_think(message.get("content") or ""),
            memory_tokens=None,
            processed=max(0, prompt_tokens - cached),
            cached=cached,
            generated=generated,
            generate_s=seconds,
        )

    def count_tokens(self, prompt: Prompt) -> int | None:
        """Tokens of the system and user texts, or None when the server has no ``/tokenize``.

        An approximation of the templated prompt: chat-template tokens are not counted, and the
        pieces (system, intro, memory, query) are tokenised separately so that the memory's count
        is reused across queries, which can differ by a token or so at each seam.
        """
        total = 0
        for text in (prompt.system, prompt.intro, prompt.memory_text, prompt.query):
            n = self._count(text)
            if n is None:
                return None
            total += n
        return total

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OpenAIEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, text: str) -> int | None:
        if not text:
            return 0
        if self._tokenize_ok is False:
            return None
        key = hashlib.sha256(text.encode()).hexdigest()
        # Held across the request so concurrent reads of a new memory tokenise it once.
        with self._count_lock:
            if key in self._counts:
                self._counts.move_to_end(key)
                return self._counts[key]
            n = self._tokenize(text)
            if n is not None:
                self._counts[key] = n
                if len(self._counts) > _COUNT_CACHE_SIZE:
                    self._counts.popitem(last=False)
            return n

    def _tokenize(self, text: str) -> int | None:
        url = f"{self.server_root}/tokenize"
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        try:
            resp, _ = self._http.post_json(url, body)
        except EngineError as e:  # unreachable now; /tokenize may still exist, so try again next time
            log.warning("token count unavailable: %s", e)
            return None
        try:
            if resp.is_error:
                raise ValueError(f"HTTP {resp.status_code}: {_server_message(resp)[0]}")
            data = resp.json()
            n = int(data["count"]) if "count" in data else len(data["tokens"])
        except (ValueError, KeyError, TypeError) as e:
            log.info("no usable %s (%s): token counts are unknown for %s", url, e, self.id)
            self._tokenize_ok = False
            return None
        self._tokenize_ok = True
        if self.context_length is None:
            self.context_length = _as_int(data.get("max_model_len"))
        return n

    def _first_model(self) -> dict[str, Any]:
        models = self._models(strict=True)
        if not models:
            raise ModelUnavailable(f"{self.base_url}/models lists no model: name one, e.g. {SPEC_EXAMPLE}")
        return models[0]

    def _models(self, *, strict: bool) -> list[dict[str, Any]]:
        """The entries of ``GET /models``; with `strict` False a failure gives [] after one try."""
        url = f"{self.base_url}/models"
        try:
            resp, _ = self._http.get_json(url, retries=None if strict else 0)
            if resp.is_error:
                raise _http_error("GET", url, resp)
            data = _json(resp, url).get("data")
            if not isinstance(data, list):
                raise EngineError(f"GET {url}: unexpected answer, no model list in {resp.text[:300]}")
            return [e for e in data if isinstance(e, dict) and e.get("id")]
        except EngineError:
            if strict:
                raise
            return []

    def _chat_error(self, resp: httpx.Response, url: str, max_new_tokens: int) -> Exception:
        message, fields = _server_message(resp)
        flags = f"{message} {fields.get('code', '')} {fields.get('type', '')}"
        if resp.status_code not in (400, 413) or not _OVERFLOW.search(flags):
            return _http_error("POST", url, resp)
        needed, limit = _overflow_lengths(message, fields, max_new_tokens)
        if limit > 0 and self.context_length is None:
            self.context_length = limit
        sizes = f"needs {needed} tokens, the limit is {limit}" if needed > 0 and limit > 0 else "too long"
        return ContextOverflow(
            f"prompt does not fit the context of {self.model} at {url}: {sizes} (server said: {message})",
            needed=needed,
            limit=limit,
        )


def _json(resp: httpx.Response, url: str) -> dict[str, Any]:
    try:
        data = resp.json()
    except ValueError as e:
        raise EngineError(f"{url}: answer is not JSON: {resp.text[:300]!r}") from e
    if not isinstance(data, dict):
        raise EngineError(f"{url}: unexpected answer {str(data)[:300]}")
    return data


def _server_message(resp: httpx.Response) -> tuple[str, dict[str, Any]]:
    """The error text a server put in its answer, and the object that held it."""
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase, {}
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"]), err
        if isinstance(err, str):
            return err, data
        for key in ("message", "detail"):
            if data.get(key):
                return str(data[key]), data
    return str(data)[:500], {}


def _http_error(method: str, url: str, resp: httpx.Response) -> EngineError:
    message = _server_message(resp)[0]
    hint = " (does the base URL end in /v1?)" if resp.status_code == 404 and "/v1/" not in url else ""
    return EngineError(f"{method} {url} failed with HTTP {resp.status_code}: {message}{hint}")


def _overflow_lengths(message: str, fields: dict[str, Any], max_new_tokens: int) -> tuple[int, int]:
    """(tokens the request needs, the model's limit) as stated by the server; -1 where unstated."""
    limit = _as_int(fields.get("n_ctx")) or _first_int(_LIMIT, message) or -1
    total = _first_int(_TOTAL, message)
    if total is not None:
        return total, limit
    prompt = _as_int(fields.get("n_prompt_tokens")) or _first_int(_INPUT, message)
    return (prompt + max_new_tokens if prompt is not None else -1), limit


def _first_int(patterns: list[re.Pattern[str]], text: str) -> int | None:
    for pattern in patterns:
        if m := pattern.search(text):
            return int(m.group(1))
    return None


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _cut(text: str, until: Callable[[str], bool]) -> str:
    for end in range(1, len(text) + 1):
        if until(text[:end]):
            return text[:end]
    return text
