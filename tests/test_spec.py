"""The one spec parser: ``scheme:target`` strings and OpenAI-compatible ``URL#MODEL`` targets."""

from __future__ import annotations

import pytest

from linmem import _spec
from linmem._spec import Forms, Spec
from linmem.embedders import OpenAIEmbedder, load_embedder
from linmem.engines import FORMS as ENGINE_FORMS
from linmem.engines import load_engine
from linmem.errors import UnknownSpec
from linmem.service.core import Allowed
from linmem.video import load_captioner
from linmem.video.captioners import OpenAITranscriber, load_transcriber

FORMS = Forms("widget", {"a": "a:NAME", "b": "b:PATH"}, bare=("plain",), examples=("a:x",))


def test_a_spec_splits_at_its_first_colon_and_loses_outer_whitespace() -> None:
    assert FORMS.parse("a:x") == Spec("a", "x")
    assert FORMS.parse("  b :  C:/models/m.gguf \n") == Spec("b", "C:/models/m.gguf")
    assert FORMS.parse("a:host:8000/x") == Spec("a", "host:8000/x")
    assert str(FORMS.parse(" a: x ")) == "a:x"


@pytest.mark.parametrize("spec", ["", "   ", "a", "a:", "a:   ", ":x", "c:x", "A:x", "ax"])
def test_a_bad_spec_is_named_with_every_accepted_form(spec: str) -> None:
    with pytest.raises(UnknownSpec) as caught:
        FORMS.parse(spec)
    assert str(caught.value) == f"unknown widget {spec!r}: expected plain, a:NAME or b:PATH (e.g. a:x)"


def test_a_refusal_can_say_why() -> None:
    message = str(FORMS.refuse("a:1", "too small"))
    assert message == "unknown widget 'a:1' (too small): expected plain, a:NAME or b:PATH (e.g. a:x)"
    assert str(Forms("thing", {"a": "a:X"}).refuse("q")) == "unknown thing 'q': expected a:X"


def test_split_checks_nothing() -> None:
    assert _spec.split("hash") == Spec("hash", "")
    assert _spec.split(" hash : 64 ") == Spec("hash", "64")


@pytest.mark.parametrize(
    ("target", "url", "model"),
    [
        ("http://127.0.0.1:8000/v1#m", "http://127.0.0.1:8000/v1", "m"),
        ("https://api.example.com/v1/#org/Model-7B", "https://api.example.com/v1", "org/Model-7B"),
        ("  http://h/v1  #  m  ", "http://h/v1", "m"),
        ("http://h/v1#tag#2", "http://h/v1", "tag#2"),  # a URL has no '#': the rest is the model
        ("http://[::1]:9/v1#m", "http://[::1]:9/v1", "m"),
        ("http://h/v1", "http://h/v1", None),
    ],
)
def test_an_endpoint_is_a_base_url_and_maybe_a_model(target: str, url: str, model: str | None) -> None:
    assert _spec.endpoint(target, need_model=False) == (url, model)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("", "no URL"),
        ("#m", "no URL"),
        ("localhost:8000/v1#m", "'localhost:8000/v1' is not an http(s) URL"),
        ("127.0.0.1#m", "'127.0.0.1' is not an http(s) URL"),
        ("ftp://h/v1#m", "'ftp://h/v1' is not an http(s) URL"),
        ("http://#m", "'http://' names no host"),
        ("http://h:port/v1#m", "'http://h:port/v1' is not a valid URL"),
        ("http://my host/v1#m", "'http://my host/v1' has whitespace in it"),
        ("http://h/v1#", "no model after '#'"),
        ("http://h/v1#   ", "no model after '#'"),
    ],
)
def test_a_bad_endpoint_says_what_is_wrong(target: str, why: str) -> None:
    with pytest.raises(UnknownSpec, match="e.g. openai:http://") as caught:
        _spec.endpoint(target, need_model=False)
    assert f"bad OpenAI-compatible endpoint {target!r}: {why}" in str(caught.value)


def test_a_model_can_be_required_and_a_loader_can_word_the_refusal() -> None:
    with pytest.raises(UnknownSpec, match="'http://h/v1': no #MODEL; expected an http"):
        _spec.endpoint("http://h/v1", need_model=True)
    with pytest.raises(UnknownSpec, match=r"^unknown widget 'a:z' \(no #MODEL\): expected plain"):
        _spec.endpoint("http://h/v1", need_model=True, refuse=lambda why: FORMS.refuse("a:z", why))
    assert _spec.endpoint("http://h/v1#m", need_model=True) == ("http://h/v1", "m")


def test_a_base_url_is_checked_and_trimmed() -> None:
    assert _spec.base_url(" http://h:1/v1/ ") == "http://h:1/v1"
    with pytest.raises(UnknownSpec, match="bad OpenAI-compatible base URL 'h:1/v1': 'h:1/v1' is not an http"):
        _spec.base_url("h:1/v1")


def test_engine_specs_list_gguf_and_keep_colons_in_paths() -> None:
    assert ENGINE_FORMS.parse("gguf:/models/qwen.gguf") == Spec("gguf", "/models/qwen.gguf")
    assert ENGINE_FORMS.parse("gguf:Qwen3.5-0.8B-Q8_0") == Spec("gguf", "Qwen3.5-0.8B-Q8_0")
    for spec in ("gpt:whatever", "gguf:", "openai", " "):
        with pytest.raises(
            UnknownSpec, match=r"hf:REPO_OR_PATH, openai:URL#MODEL, gguf:PATH_OR_NAME or tiny:NAME"
        ):
            load_engine(spec)


def test_embedder_specs_split_the_endpoint_at_the_first_hash() -> None:
    embedder = load_embedder(" openai:http://127.0.0.1:9/v1/#org/emb#v2 ")  # no request is made yet
    inner = getattr(embedder, "inner", embedder)
    assert isinstance(inner, OpenAIEmbedder)
    assert (inner.base_url, inner.model) == ("http://127.0.0.1:9/v1", "org/emb#v2")
    assert inner.id == "openai:http://127.0.0.1:9/v1#org/emb#v2"
    with pytest.raises(UnknownSpec, match=r"'openai:http://h/v1' \(no #MODEL\): expected minilm"):
        load_embedder("openai:http://h/v1")
    with pytest.raises(UnknownSpec, match=r"'hash:-3' \(hash:DIM needs a whole number"):
        load_embedder("hash:-3")


def test_the_service_still_allows_small_hash_embedders() -> None:
    allowed = Allowed()
    assert allowed.embedder("hash:64") == "hash:64"
    assert allowed.embedder(" hash ") == "hash:256"


def test_transcriber_specs_default_the_model_and_refuse_bad_endpoints() -> None:
    default = load_transcriber("openai:http://127.0.0.1:9/v1")
    named = load_transcriber("openai: http://127.0.0.1:9/v1/ #whisper#large")
    assert isinstance(default, OpenAITranscriber) and isinstance(named, OpenAITranscriber)
    assert (default.base_url, default.model) == ("http://127.0.0.1:9/v1", "whisper-1")
    assert (named.base_url, named.model) == ("http://127.0.0.1:9/v1", "whisper#large")
    for spec, why in [
        ("whisper:x", ""),
        ("openai:", ""),
        ("openai:localhost:9/v1", " ('localhost:9/v1' is not an http(s) URL)"),
        ("openai:http://h/v1#", " (no model after '#')"),
    ]:
        with pytest.raises(UnknownSpec) as caught:
            load_transcriber(spec)
        assert str(caught.value).startswith(f"unknown transcriber {spec!r}{why}: expected openai:URL#MODEL")


@pytest.mark.parametrize("spec", ["bogus:x", "tiny:qwen3.5", "hf:", "openai"])
def test_captioner_specs_list_their_forms(spec: str) -> None:
    with pytest.raises(UnknownSpec, match=r"hf:REPO_OR_PATH, openai:URL#MODEL or tiny:qwen3.5-vl"):
        load_captioner(spec)


def test_a_captioner_endpoint_is_checked_by_the_same_rule() -> None:
    with pytest.raises(UnknownSpec, match="bad OpenAI-compatible endpoint 'ftp://h/v1#m'"):
        load_captioner("openai:ftp://h/v1#m")
