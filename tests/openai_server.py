"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests: the stand-in for a remote endpoint.

It speaks the wire format (`/v1/chat/completions`, `/v1/embeddings`, `/v1/audio/transcriptions`,
`/v1/models`, `/tokenize`)
over a real socket; what it answers is decided by plain Python callables the test passes in.
Every request body is recorded so tests can check what a client actually sent.
Options simulate what real servers do to clients: scripted error answers, a context limit that
rejects long prompts with vLLM's message, a missing `/tokenize` route, a slow answer.
"""

from __future__ import annotations

import email.policy
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ChatFn = Callable[[dict[str, Any]], dict[str, Any]]
EmbedFn = Callable[[list[str]], list[list[float]]]
# (uploaded audio file, form fields) -> transcript text
TranscribeFn = Callable[[bytes, dict[str, str]], str]


def _words(text: str) -> int:
    return max(1, len(text.split()))


def echo_chat(request: dict[str, Any]) -> dict[str, Any]:
    """Default chat behaviour: answer with the last line of the last user message.

    A chat callable returns ``{"content": ...}``, optionally with ``"usage"`` fields that replace
    the computed ones (e.g. ``{"prompt_tokens_details": None}``).
    """
    user = text_of(request["messages"][-1]["content"])
    return {"content": "echo: " + user.strip().splitlines()[-1]}


def text_of(content: Any) -> str:
    """The text of a message content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


@dataclass
class ScriptedChat:
    """A chat callable that answers with pre-written replies, in order, and records every message
    list it was sent: a scripted controller or judge. Past the script it answers `after`."""

    replies: list[str]
    after: str = ""
    calls: list[list[dict[str, Any]]] = field(default_factory=list)

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(request["messages"])
        return {"content": self.replies.pop(0) if self.replies else self.after}


@dataclass
class OpenAIServer:
    chat: ChatFn = echo_chat
    embed: EmbedFn | None = None
    transcribe: TranscribeFn | None = None
    model: str = "test-model"
    # Simulate a server prefix cache: the longest previously seen prompt prefix counts as cached.
    prefix_cache: bool = True
    api_key: str | None = None
    # Scripted failures: each POST pops the first (status, message) and answers it as an error.
    errors: list[tuple[int, str]] = field(default_factory=list)
    # Chat prompts whose words plus max_tokens exceed this get vLLM's 400; /models lists it.
    context_length: int | None = None
    tokenize: bool = True  # False: no /tokenize route, like OpenAI itself
    delay_s: float = 0.0  # chat answers wait this long, to exercise client timeouts
    models_delay_s: float = 0.0  # /v1/models answers wait this long (a server slow to list models)
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)  # paths of GET requests, in order
    headers: list[dict[str, str]] = field(default_factory=list)  # lower-cased, one per request
    url: str = ""

    def __enter__(self) -> OpenAIServer:
        server = self
        seen: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def do_GET(self) -> None:
                server.gets.append(self.path)
                if self.path.rstrip("/") == "/v1/models":
                    time.sleep(server.models_delay_s)
                    entry: dict[str, Any] = {"id": server.model, "object": "model"}
                    if server.context_length is not None:
                        entry["max_model_len"] = server.context_length
                    self._send(200, {"object": "list", "data": [entry] if server.model else []})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                kind = self.headers.get("Content-Type", "")
                body = _multipart(kind, raw) if kind.startswith("multipart/") else json.loads(raw or b"{}")
                server.requests.append((self.path, body))
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._send(401, {"error": {"message": "bad api key"}})
                    return
                try:
                    self._send(*server._answer(self.path, body, seen))
                except Exception as e:  # the test server reports, never hangs
                    self._send(500, {"error": {"message": repr(e)}})

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _answer(self, path: str, body: dict[str, Any], seen: list[str]) -> tuple[int, dict[str, Any]]:
        """Status and JSON body for an authorised POST."""
        if self.errors:
            status, message = self.errors.pop(0)
            return status, _error(status, message)
        if path == "/v1/chat/completions":
            time.sleep(self.delay_s)
            too_long = self._overflow(body)
            return (400, _error(400, too_long)) if too_long else (200, self._chat_response(body, seen))
        if path == "/v1/embeddings" and self.embed is not None:
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            vecs = self.embed(inputs)
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
            return 200, {"object": "list", "data": data, "model": body.get("model")}
        if path == "/v1/audio/transcriptions" and self.transcribe is not None:
            return 200, {"text": self.transcribe(body["file"], body["fields"])}
        if path == "/tokenize" and self.tokenize:
            text = body.get("prompt") or "".join(text_of(m["content"]) for m in body.get("messages", []))
            return 200, {"count": _words(text), "max_model_len": self.context_length or 4096}
        return 404, {"error": {"message": f"no route {path}"}}

    def _overflow(self, body: dict[str, Any]) -> str | None:
        """vLLM's rejection of a prompt that does not fit `context_length`, or None."""
        if self.context_length is None:
            return None
        prompt = _words("".join(text_of(m["content"]) for m in body["messages"]))
        completion = int(body.get("max_tokens") or 0)
        if prompt + completion <= self.context_length:
            return None
        return (
            f"This model's maximum context length is {self.context_length} tokens. However, you requested "
            f"{prompt + completion} tokens ({prompt} in the messages, {completion} in the completion). "
            "Please reduce the length of the messages or completion."
        )

    def _chat_response(self, body: dict[str, Any], seen: list[str]) -> dict[str, Any]:
        reply = self.chat(body)
        prompt = "".join(text_of(m["content"]) for m in body["messages"])
        prompt_tokens = _words(prompt)
        cached = 0
        if self.prefix_cache:
            best = max((_common_prefix(prompt, s) for s in seen), default="")
            cached = _words(best) - 1 if best.strip() else 0
            seen.append(prompt)
        content = reply["content"]
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _words(content),
            "total_tokens": prompt_tokens + _words(content),
            "prompt_tokens_details": {"cached_tokens": max(0, cached)},
            **reply.get("usage", {}),
        }
        return {
            "id": f"chatcmpl-{time.time_ns()}",
            "object": "chat.completion",
            "model": body.get("model", self.model),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": usage,
        }


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 makes concurrent clients wait out SYN retries


def _multipart(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart/form-data upload as {"fields": {name: text}, "file": bytes, "filename": str}."""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + raw
    )
    out: dict[str, Any] = {"fields": {}, "file": b"", "filename": None}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if part.get_filename():
            out["file"], out["filename"] = data, part.get_filename()
        else:
            out["fields"][str(name)] = data.decode()
    return out


def _error(status: int, message: str) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "BadRequestError" if status == 400 else "Error", "code": status}
    }


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]
