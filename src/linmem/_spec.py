"""The one parser for spec strings: ``scheme:target`` names an engine, embedder, captioner or transcriber.

Every loader describes the schemes it accepts with a `Forms` and asks it to `parse` a spec; a spec
it cannot use is refused with the same kind of message everywhere: the spec as given, then every
accepted form. OpenAI-compatible targets (``http://host:port/v1#MODEL``) are split and checked by
`endpoint`, so the engine, the embedder and the transcriber agree on what such a target means.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import UnknownSpec

ENDPOINT_EXAMPLE = "openai:http://127.0.0.1:8000/v1#moonshotai/Kimi-Linear-48B-A3B-Instruct"


@dataclass(frozen=True)
class Spec:
    """A spec split at its first colon, both halves stripped of surrounding whitespace."""

    scheme: str
    target: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}"


def split(spec: str) -> Spec:
    """`spec` split at its first colon, without checking either half; no colon gives an empty target.

    The first colon, because a target may hold colons of its own (a URL's port, a Windows path).
    """
    scheme, _, target = spec.strip().partition(":")
    return Spec(scheme.strip(), target.strip())


@dataclass(frozen=True)
class Forms:
    """The specs one loader accepts, for parsing them and for saying what was expected.

    `kinds` maps each scheme to its form as the error message shows it (``"hf": "hf:REPO_OR_PATH"``),
    in the order shown. `bare` lists accepted spellings that have no scheme (``minilm``): they are
    shown first and are the loader's to resolve before parsing. `examples` end the message.
    """

    what: str
    kinds: Mapping[str, str]
    bare: tuple[str, ...] = ()
    examples: tuple[str, ...] = ()

    def parse(self, spec: str) -> Spec:
        """`spec` as a `Spec` of one of `kinds` with a non-empty target; UnknownSpec otherwise."""
        parsed = split(spec)
        if parsed.scheme not in self.kinds or not parsed.target:
            raise self.refuse(spec)
        return parsed

    def refuse(self, spec: str, why: str = "") -> UnknownSpec:
        """The error for a spec this loader cannot use; `why` says what was wrong, when known."""
        reason = f" ({why})" if why else ""
        forms = _listing([*self.bare, *self.kinds.values()])
        examples = f" (e.g. {', '.join(self.examples)})" if self.examples else ""
        return UnknownSpec(f"unknown {self.what} {spec!r}{reason}: expected {forms}{examples}")


def endpoint(
    target: str, *, need_model: bool, refuse: Callable[[str], UnknownSpec] | None = None
) -> tuple[str, str | None]:
    """The base URL and model of an OpenAI-compatible target ``URL[#MODEL]``.

    Split at the first '#': a URL has no '#' before its fragment, so everything after it is the
    model, '#' included. A '#' with nothing after it is refused rather than read as "no model", and
    so is a missing model when `need_model`; without '#' the model is None. `refuse` turns what was
    wrong into the error to raise, for a loader that lists its own forms.
    """
    url, hash_sign, model = target.strip().partition("#")
    url, model = url.strip(), model.strip()
    why = (
        _url_problem(url)
        or ("no model after '#'" if hash_sign and not model else "")
        or ("no #MODEL" if need_model and not model else "")
    )
    if why:
        if refuse is not None:
            raise refuse(why)
        expected = (
            "an http(s) base URL and #MODEL" if need_model else "an http(s) base URL, optionally with #MODEL"
        )
        raise UnknownSpec(
            f"bad OpenAI-compatible endpoint {target!r}: {why}; expected {expected}, e.g. {ENDPOINT_EXAMPLE}"
        )
    return url.rstrip("/"), model or None


def base_url(url: str) -> str:
    """`url` without trailing slashes, once it is known to be an http(s) URL with a host."""
    url = url.strip()
    why = _url_problem(url)
    if why:
        raise UnknownSpec(
            f"bad OpenAI-compatible base URL {url!r}: {why}; expected one like http://127.0.0.1:8000/v1"
        )
    return url.rstrip("/")


def _url_problem(url: str) -> str:
    """What keeps `url` from being a server's base URL, or "" when nothing does."""
    if not url:
        return "no URL"
    if any(c.isspace() for c in url):
        return f"{url!r} has whitespace in it"
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return f"{url!r} is not an http(s) URL"
        parts.port  # noqa: B018 - reading it raises ValueError for a port that is not a number
    except ValueError as e:
        return f"{url!r} is not a valid URL ({e})"
    return "" if parts.hostname else f"{url!r} names no host"


def _listing(forms: list[str]) -> str:
    """``a, b or c``: the forms as a sentence reads them."""
    return forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"
