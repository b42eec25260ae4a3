"""The shared OpenAI-compatible HTTP client, and the embedder and transcriber that now use it,
against a real loopback server: bearer key, retries of transient failures, what is not retried."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from openai_server import OpenAIServer

from linmem._http import OpenAIClient
from linmem.embedders import HashEmbedder, OpenAIEmbedder
from linmem.errors import EngineError
from linmem.video.captioners import OpenAITranscriber

WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(64))  # content is the server's business


def vectors(texts: list[str]) -> list[list[float]]:
    return (HashEmbedder(16).embed(texts) * 2.0).tolist()


def posts(server: OpenAIServer, path: str) -> int:
    return sum(p == path for p, _ in server.requests)


def free_url() -> str:
    """A loopback URL where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def test_the_embedder_retries_a_503_and_sends_the_key() -> None:
    with OpenAIServer(embed=vectors, api_key="k3y", errors=[(503, "warming up")]) as server:
        embedder = OpenAIEmbedder(server.url, "emb", api_key="k3y", backoff_s=0.01)
        got = embedder.embed(["a cat", "a mat"])
        embedder.close()
    np.testing.assert_allclose(got, HashEmbedder(16).embed(["a cat", "a mat"]), atol=1e-6)
    assert posts(server, "/v1/embeddings") == 2
    assert [h["authorization"] for h in server.headers] == ["Bearer k3y"] * 2


def test_the_embedder_takes_the_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    with OpenAIServer(embed=vectors, api_key="from-env", errors=[(429, "slow down")]) as server:
        assert OpenAIEmbedder(server.url, "emb", backoff_s=0.01).embed(["x"]).shape == (1, 16)
    assert {h["authorization"] for h in server.headers} == {"Bearer from-env"}


def test_the_embedder_gives_up_after_its_retries_with_its_own_message() -> None:
    with OpenAIServer(embed=vectors, errors=[(503, "down")] * 5) as server:
        with pytest.raises(EngineError, match=r"embedding request to .*/v1/embeddings returned HTTP 503"):
            OpenAIEmbedder(server.url, "emb", retries=1, backoff_s=0.01).embed(["x"])
    assert posts(server, "/v1/embeddings") == 2


def test_the_transcriber_retries_a_503_and_uploads_the_same_file_again() -> None:
    heard: list[tuple[bytes, dict[str, str]]] = []

    def transcribe(audio: bytes, fields: dict[str, str]) -> str:
        heard.append((audio, fields))
        return "  hello there  "

    with OpenAIServer(transcribe=transcribe, api_key="k3y", errors=[(503, "loading model")]) as server:
        transcriber = OpenAITranscriber(server.url, "whisper-1", api_key="k3y", backoff_s=0.01)
        text = transcriber.transcribe(WAV)
        transcriber.close()
    assert text == "hello there"
    uploads = [body for p, body in server.requests if p == "/v1/audio/transcriptions"]
    assert len(uploads) == 2 and all(u["file"] == WAV for u in uploads)
    assert heard == [(WAV, {"model": "whisper-1", "response_format": "json"})]
    assert [h["authorization"] for h in server.headers] == ["Bearer k3y"] * 2


def test_no_key_means_no_authorization_header() -> None:
    with OpenAIServer(transcribe=lambda audio, fields: "ok") as server:
        assert OpenAITranscriber(server.url, "w").transcribe(WAV) == "ok"
    assert all("authorization" not in h for h in server.headers)


def test_a_client_error_is_answered_not_retried() -> None:
    with OpenAIServer(errors=[(400, "bad field"), (503, "never reached")]) as server:
        with OpenAIClient(server.url, retries=3, backoff_s=0.01) as client:
            reply = client.post_json("chat/completions", {"model": "m"})
    assert reply.response.status_code == 400 and "bad field" in reply.response.text
    assert reply.seconds >= 0 and len(server.requests) == 1


def test_the_last_transient_answer_is_handed_back_when_retries_run_out() -> None:
    with OpenAIServer(errors=[(500, "a"), (502, "b"), (503, "c")]) as server:
        with OpenAIClient(server.url, retries=2, backoff_s=0.01) as client:
            reply = client.post_json("/chat/completions", {})
    assert reply.response.status_code == 503 and len(server.requests) == 3


def test_paths_are_below_the_base_url_and_absolute_urls_go_as_given() -> None:
    with OpenAIServer() as server, OpenAIClient(server.url + "/") as client:
        assert client.url("models") == client.url("/models") == f"{server.url}/models"
        models = client.get_json("models").response.json()
        root = server.url.removesuffix("/v1")
        counted = client.post_json(f"{root}/tokenize", {"prompt": "one two three"}).response.json()
    assert models["data"][0]["id"] == "test-model" and counted["count"] == 3
    assert server.gets == ["/v1/models"] and server.requests[0][0] == "/tokenize"


def test_an_unreachable_server_is_retried_then_named() -> None:
    url = free_url()
    with OpenAIClient(url, retries=1, backoff_s=0.01) as client:
        with pytest.raises(EngineError, match=rf"POST {url}/embeddings failed: cannot reach the server"):
            client.post_json("embeddings", {})
    with pytest.raises(EngineError, match=rf"POST {url}/audio/transcriptions failed: cannot reach"):
        OpenAITranscriber(url, "w", retries=0).transcribe(WAV)


def test_a_read_timeout_is_not_retried() -> None:
    with (
        OpenAIServer(delay_s=1.0) as server,
        OpenAIClient(server.url, timeout_s=0.2, backoff_s=0.01) as client,
    ):
        with pytest.raises(EngineError, match=r"chat/completions failed: no answer within 0.2s"):
            client.post_json("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert len(server.requests) == 1
