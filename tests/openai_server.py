"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests: the stand-in for a remote endpoint.

It speaks the wire format (`/v1/chat/completions`, `/v1/embeddings`, `/v1/models`, `/tokenize`)
over a real socket; what it answers is decided by plain Python callables the test passes in.
Every request body is recorded so tests can check what a client actually sent.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ChatFn = Callable[[dict[str, Any]], dict[str, Any]]
EmbedFn = Callable[[list[str]], list[list[float]]]


def _words(text: str) -> int:
    return max(1, len(text.split()))


def echo_chat(request: dict[str, Any]) -> dict[str, Any]:
    """Default chat behaviour: answer with the last line of the last user message."""
    user = request["messages"][-1]["content"]
    return {"content": "echo: " + user.strip().splitlines()[-1]}


@dataclass
class OpenAIServer:
    chat: ChatFn = echo_chat
    embed: EmbedFn | None = None
    model: str = "test-model"
    # Simulate a server prefix cache: the longest previously seen prompt prefix counts as cached.
    prefix_cache: bool = True
    api_key: str | None = None
    requests: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    url: str = ""

    def __enter__(self) -> OpenAIServer:
        server = self
        seen: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": server.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                server.requests.append((self.path, body))
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._send(401, {"error": {"message": "bad api key"}})
                    return
                try:
                    if self.path == "/v1/chat/completions":
                        self._send(200, server._chat_response(body, seen))
                    elif self.path == "/v1/embeddings" and server.embed is not None:
                        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                        vecs = server.embed(inputs)
                        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
                        self._send(200, {"object": "list", "data": data, "model": body.get("model")})
                    elif self.path == "/tokenize":
                        text = body.get("prompt") or "".join(m["content"] for m in body.get("messages", []))
                        self._send(200, {"count": _words(text), "max_model_len": 4096})
                    else:
                        self._send(404, {"error": {"message": f"no route {self.path}"}})
                except Exception as e:  # the test server reports, never hangs
                    self._send(500, {"error": {"message": repr(e)}})

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _chat_response(self, body: dict[str, Any], seen: list[str]) -> dict[str, Any]:
        reply = self.chat(body)
        prompt = "".join(m["content"] for m in body["messages"])
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
        }
        return {
            "id": f"chatcmpl-{time.time_ns()}",
            "object": "chat.completion",
            "model": body.get("model", self.model),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": usage,
        }


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]
