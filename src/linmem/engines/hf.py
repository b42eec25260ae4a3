"""Local Hugging Face transformers engine: prompts to token ids, state prefill, forks and greedy decoding.

The memory prompt is tokenised in pieces and the ids concatenated: the chat-template head (through
the memory intro), then each rendered item on its own, then the tail (query and generation
prompt). Cached and stateless reads therefore run on exactly the same ids, and the ids of a longer
memory start with the ids of a shorter one, so a state snapshot is an exact prefix.

Model caches (transformers `DynamicCache`: recurrent and conv states for linear-attention layers,
keys and values for attention layers) are updated in place by a forward pass, so a read always
works on a `fork` (deep copy) and never touches the snapshot it came from.

Several reads of one cache run as one batch (`advance_rows`, then `greedy_rows`). Padding is not
neutral for linear-attention layers (every token moves their decay and conv window), so the
prompts are never padded: the rows, sorted by length, run their common positions together, and a
row that ends leaves the batch with its state. For decoding the rows are stacked again, their
attention keys and values right-padded to one width and the padding hidden by the attention mask,
each row at its own position; linear-attention rows hold their own states and need no mask.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import ModelUnavailable
from .base import LocalEngine, strip_think, threads, transcript

# transformers routes linear-attention kernels to fla / causal-conv1d / mamba-ssm whenever they are
# importable, and those are GPU-only (Triton): on a CPU-only machine a forward pass then fails.
# Hide them before transformers looks, unless a GPU is there to run them.
_GPU_ONLY = ("fla", "causal_conv1d", "mamba_ssm")

PREFILL_CHUNK = 2048
# A window's attention mask holds (window x cached tokens) entries; cap it at a 4k prefill's.
MASK_ELEMENTS = PREFILL_CHUNK * 4096
MIN_CHUNK = 128
# What one batch of reads may hold in model caches (each row carries its own copy of the memory's
# attention keys and values); the reader splits larger batches.
BATCH_BYTES = 2 << 30


def torch_device() -> str:
    """The device local torch models run on: $LINMEM_DEVICE, else CUDA when present, else the CPU."""
    import torch

    want = os.environ.get("LINMEM_DEVICE")
    if want:
        return want
    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_torch(device: str) -> None:
    """On the CPU: hide the GPU-only kernel packages from transformers, and put linmem's exact
    CPU delta-rule kernels in place of transformers' reference fallbacks (linmem.kernels)."""
    if device.startswith("cpu"):
        import torch

        # One setting for the process (torch has no other): LINMEM_THREADS, else half the cores.
        torch.set_num_threads(threads())
        for name in _GPU_ONLY:
            if name not in sys.modules:
                sys.modules[name] = None  # type: ignore[assignment]
        from ..kernels import install

        install()
        # transformers announces, once a kernel, that each package hidden above is missing. On the
        # CPU that is by design, so those notices (and only those) are dropped.
        hub = logging.getLogger("transformers.integrations.hub_kernels")
        if not any(isinstance(f, _HiddenKernelNotice) for f in hub.filters):
            hub.addFilter(_HiddenKernelNotice())


# The distributions of the _GPU_ONLY packages, as transformers names them in its notice.
_HIDDEN_DISTRIBUTIONS = ("`causal_conv1d`", "`flash-linear-attention`", "`mamba_ssm`", "`mamba-ssm`")


class _HiddenKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("falling back to its reference PyTorch implementation" in message
                    and any(d in message for d in _HIDDEN_DISTRIBUTIONS))  # fmt: skip


class HFEngine(LocalEngine):
    """A causal LM from transformers, with the operations the state cache needs.

    `id` names the model for answers; `fingerprint` identifies config and weights, so a state
    snapshot is never applied to a different model.
    """

    def __init__(self, model: Any, tokenizer: Any, *, id: str, fingerprint: str, label: str = "") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.id = id
        self.label = label
        # The tokenizer decides the ids a snapshot was built from, so it is part of the identity.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        vocab = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
        self.fingerprint = hashlib.sha256(f"{fingerprint}\0{vocab}".encode()).hexdigest()
        self.config_hash = hashlib.sha256(
            json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode()
        ).hexdigest()
        self.context_length: int | None = _context_length(model, tokenizer)
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        # transformers 5.2x renamed `past_key_values` to `cache`; accept both.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.stop_ids = _stop_ids(model, tokenizer)
        import torch
        import transformers

        self.versions = {"transformers": transformers.__version__, "torch": torch.__version__}
        self._compute = threading.Lock()
        self._tokenize = threading.Lock()
        self._split_cache: dict[tuple[str, str, str, str], tuple[str, str]] = {}

    def _forward(self, x: Any, **kwargs: Any) -> Any:
        # One forward pass at a time per model: on a CPU each already uses every core, and
        # interleaving threads' passes would only thrash the caches (the service batches instead).
        with self._compute:
            return self.model(x, **kwargs)

    @property
    def attention(self) -> str:
        """ "linear hybrid", "linear" or "softmax": what kind of state the model keeps."""
        from transformers.cache_utils import LinearAttentionLayer

        kinds = {type(layer) is LinearAttentionLayer for layer in self.new_cache().layers}
        return "linear hybrid" if kinds == {True, False} else "linear" if kinds == {True} else "softmax"

    # Prompt -> ids

    def render(self, messages: list[dict[str, str]]) -> str:
        return _apply_template(self.tokenizer, messages)

    def encode(self, text: str, *, specials: bool = True) -> list[int]:
        """Token ids of `text` without added BOS/EOS. With `specials=False`, text that looks like a
        special token (e.g. "<|im_end|>" inside a memory item) stays plain text."""
        if not text:
            return []
        # `split_special_tokens` is applied by setting a flag on the shared Rust tokenizer for the
        # call: two threads encoding at once (one with specials, one without) would each get the
        # other's setting, and a snapshot head would gain the bytes of "<|im_start|>" as text.
        with self._tokenize:
            ids = self.tokenizer(text, add_special_tokens=False, split_special_tokens=not specials).input_ids
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return strip_think(str(self.tokenizer.decode(list(ids), skip_special_tokens=True)))

    # State operations

    def new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def fork(self, cache: Any) -> Any:
        """A copy of `cache` that a forward pass can update without touching the original.

        Linear-attention states are updated in place, so they are copied (they are small and
        constant-size). Attention keys and values are shared: a `DynamicLayer` update builds a
        new tensor with torch.cat and never writes into the old one, so a fork costs O(state), not
        O(memory). The snapshot-unchanged test guards this assumption.
        """
        twin = copy.copy(cache)
        twin.layers = [self._fork_layer(layer) for layer in cache.layers]
        return twin

    def _fork_layer(self, layer: Any) -> Any:
        twin = copy.copy(layer)
        shared = _append_only(layer)
        for name, value in vars(layer).items():
            setattr(twin, name, value if name in shared else copy.deepcopy(value))
        return twin

    def advance(
        self,
        cache: Any,
        ids: Sequence[int],
        *,
        keep: int = 1,
        chunk: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Any:
        """Run `ids` through the model on top of `cache` (updated in place), in windows that
        continue the state. Returns the logits of the last `keep` positions.

        By default a window is PREFILL_CHUNK tokens, shrinking as the cache grows so that a
        window's attention mask (window x cached tokens) stays the size a 4k-token prefill needs:
        peak memory then does not grow with the memory's length. `chunk` fixes the window."""
        import torch

        if not ids:
            raise ValueError("advance() needs at least one token")
        logits = []
        past = _attention_length(cache)
        with torch.inference_mode():
            start = 0
            while start < len(ids):
                size = chunk or max(MIN_CHUNK, min(PREFILL_CHUNK, MASK_ELEMENTS // max(1, past + start)))
                window = ids[start : start + size]
                want = min(len(window), max(0, keep - (len(ids) - start - len(window))))
                x = torch.tensor([window], dtype=torch.long, device=self.device)
                out = self._forward(x, **{self._cache_kw: cache}, use_cache=True, logits_to_keep=max(1, want))
                if want:
                    logits.append(out.logits[:, -want:].float())
                if progress is not None:
                    progress(len(window))
                start += len(window)
        return torch.cat(logits, dim=1)[:, -keep:]

    def greedy(
        self,
        cache: Any,
        logits: Any,
        max_new_tokens: int,
        *,
        until: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        """Greedy decoding from the logits of the last prompt position; stops at an end token, after
        `max_new_tokens`, or once `until(tokens so far)` holds."""
        return self._decode_loop(cache, logits, max_new_tokens, lambda row: int(row.argmax()), until)

    def sample(
        self,
        cache: Any,
        logits: Any,
        max_new_tokens: int,
        *,
        temperature: float,
        seed: int,
        until: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        """Temperature sampling, reproducible: a private generator seeded with `seed`."""
        import torch

        generator = torch.Generator(device=self.device).manual_seed(seed)

        def pick(row: Any) -> int:
            probs = torch.softmax(row.float() / temperature, dim=-1)
            return int(torch.multinomial(probs, 1, generator=generator))

        return self._decode_loop(cache, logits, max_new_tokens, pick, until)

    def _decode_loop(
        self,
        cache: Any,
        logits: Any,
        max_new_tokens: int,
        pick: Callable[[Any], int],
        until: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        import torch

        out: list[int] = []
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                token = pick(logits[0, -1])
                if token in self.stop_ids:
                    break
                out.append(token)
                if len(out) == max_new_tokens or (until is not None and until(out)):
                    break
                x = torch.tensor([[token]], dtype=torch.long, device=self.device)
                logits = self._forward(x, **{self._cache_kw: cache}, use_cache=True, logits_to_keep=1).logits
        return out

    # Batched reads of one cache

    def can_batch(self) -> bool:
        """Whether this model's cache layers are ones `advance_rows` knows how to batch: plain
        attention (keys and values that only grow) and linear-attention states."""
        from transformers.cache_utils import LinearAttentionLayer

        return all(
            _append_only(layer) or type(layer) is LinearAttentionLayer for layer in self.new_cache().layers
        )

    def batch_size(self, cache: Any, new_tokens: int) -> int:
        """How many rows continuing `cache` by `new_tokens` tokens each fit in BATCH_BYTES (at least 1)."""
        fixed = grown = 0
        for layer in cache.layers:
            growing = _append_only(layer)
            for name, value in vars(layer).items():
                size = sum(t.numel() * t.element_size() for t in _tensors(value))
                if name in growing:
                    grown += size
                else:
                    fixed += size
        length = _attention_length(cache)
        row = fixed + (grown / length * (length + new_tokens) if length else 0)
        # A decoding step concatenates new keys onto the old: both copies are alive for a moment.
        return max(1, int(BATCH_BYTES // max(1.0, 2 * row)))

    def advance_rows(
        self, cache: Any, tails: Sequence[Sequence[int]], *, keep: int = 1, chunk: int = PREFILL_CHUNK
    ) -> Rows:
        """Run each of `tails` on top of `cache` (left unchanged), all in one batch; the result
        equals `advance(fork(cache), tail, keep=keep)` for each tail, ready for `greedy_rows`.

        The rows, shortest first, run the positions they share in one forward pass; the rows that
        end there are set aside with their state and the others go on, so no row ever reads a
        padding token."""
        import torch

        if not tails or not all(tails):
            raise ValueError("advance_rows() needs at least one tail, each of at least one token")
        order = sorted(range(len(tails)), key=lambda i: len(tails[i]))
        base = _attention_length(cache)
        batch = _take(cache, [0] * len(order))
        active, pos = list(order), 0
        parts: list[Any] = []
        kept: list[Any] = [None] * len(tails)
        with torch.inference_mode():
            while active:
                end = len(tails[active[0]])
                for start in range(pos, end, chunk):
                    window = [tails[i][start : min(start + chunk, end)] for i in active]
                    # Keeping each window's last `keep` positions keeps every row's last `keep`.
                    want = min(len(window[0]), keep)
                    x = torch.tensor(window, dtype=torch.long, device=self.device)
                    out = self._forward(x, **{self._cache_kw: batch}, use_cache=True, logits_to_keep=want)
                    for r, i in enumerate(active):
                        new = out.logits[r : r + 1, -want:].float()
                        kept[i] = new if kept[i] is None else torch.cat([kept[i], new], dim=1)[:, -keep:]
                pos = end
                done = sum(len(tails[i]) == end for i in active)
                if done == len(active):
                    parts.append(batch)
                    break
                parts.append(_take(batch, range(done)))
                batch = _take(batch, range(done, len(active)))
                active = active[done:]
        lengths = [base + len(tails[i]) for i in order]
        stacked = parts[0] if len(parts) == 1 else _stack(parts, max(lengths))
        return Rows(stacked, order, lengths, kept)

    def greedy_rows(
        self, rows: Rows, max_new_tokens: int, *, trace: list[list[Any]] | None = None
    ) -> list[list[int]]:
        """Greedy decoding of every row in lockstep; the tokens of each tail, in the caller's order,
        as `greedy` gives them one by one. A row that ends leaves the batch. `trace`, when given
        (one list per tail), receives the logits each token was picked from."""
        import torch

        out: list[list[int]] = [[] for _ in rows.order]
        cache = rows.cache
        live = list(rows.order)
        lengths = torch.tensor(rows.lengths, device=self.device)
        # Rows of different lengths need the mask and their own positions (none without attention).
        ragged = len(set(rows.lengths)) > 1 and _attention_length(cache) > 0
        seen = torch.arange(max(rows.lengths), device=self.device)[None, :] < lengths[:, None]
        logits = torch.cat([rows.logits[i][:, -1] for i in live])
        step = 0
        with torch.inference_mode():
            while live and max_new_tokens > 0:
                going, tokens = [], []
                for r, (i, token) in enumerate(zip(live, logits.argmax(-1).tolist(), strict=True)):
                    if trace is not None:
                        trace[i].append(logits[r])
                    if token in self.stop_ids:
                        continue
                    out[i].append(token)
                    if len(out[i]) < max_new_tokens:
                        going.append(r)
                        tokens.append(token)
                if not going:
                    break
                if len(going) < len(live):
                    cache = _take(cache, going)
                    live, lengths, seen = [live[r] for r in going], lengths[going], seen[going]
                x = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
                extra: dict[str, Any] = {}
                if ragged:
                    seen = torch.cat([seen, seen.new_ones(len(live), 1)], dim=1)
                    extra = {"attention_mask": seen.long(), "position_ids": (lengths + step)[:, None]}
                step_out = self._forward(
                    x, **{self._cache_kw: cache}, use_cache=True, logits_to_keep=1, **extra
                )
                logits = step_out.logits[:, -1].float()
                step += 1
        return out

    # Snapshot (de)serialisation: plain tensors plus JSON metadata, never pickled objects.

    def cache_to_tensors(self, cache: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch

        tensors: dict[str, Any] = {}
        layers = []
        for i, layer in enumerate(cache.layers):
            attrs: dict[str, Any] = {}
            for name, value in vars(layer).items():
                attrs[name] = _encode(value, f"{i}.{name}", tensors, torch)
            layers.append({"class": type(layer).__name__, "attrs": attrs})
        growing = [f"{i}.{name}" for i, layer in enumerate(cache.layers) for name in _append_only(layer)]
        return tensors, {"layers": layers, "growing": [k for k in growing if k in tensors]}

    def state_bytes(self, cache: Any) -> int:
        tensors, _ = self.cache_to_tensors(cache)
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def cache_from_tensors(self, tensors: dict[str, Any], meta: dict[str, Any], tokens: int) -> Any:
        import torch

        _check_tensors(tensors, meta, tokens, _template(self))
        cache = self.new_cache()
        if len(cache.layers) != len(meta["layers"]):
            raise ValueError("snapshot layer count does not match the model")
        for layer, saved in zip(cache.layers, meta["layers"], strict=True):
            if type(layer).__name__ != saved["class"]:
                raise ValueError(f"snapshot layer {saved['class']} does not match {type(layer).__name__}")
            for name, value in saved["attrs"].items():
                setattr(layer, name, _decode(value, tensors, torch, self.device))
        return cache


@dataclass
class Rows:
    """Continuations of one cache, one per row of a batch cache, ready for `greedy_rows`.

    Row r continues the caller's tail `order[r]` (rows are sorted by length) and has `lengths[r]`
    attention positions; the attention layers hold every row right-padded to the longest.
    `logits[i]` are the last prompt logits of the caller's tail i, shaped (1, keep, vocab)."""

    cache: Any
    order: list[int]
    lengths: list[int]
    logits: list[Any]


def _tensors(value: Any) -> list[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [v for v in value.values() if isinstance(v, torch.Tensor)]
    return []


def _attention_length(cache: Any) -> int:
    for layer in cache.layers:
        if _append_only(layer) and getattr(layer, "keys", None) is not None:
            return int(layer.keys.shape[-2])
    return 0


def _take(cache: Any, rows: Sequence[int]) -> Any:
    """A new cache holding these batch rows of `cache` (repeats allowed), sharing no tensor with it.

    Every tensor of the layers `can_batch` accepts is batch-first: attention keys and values
    (batch, heads, positions, dim), conv states (batch, channels, kernel) and recurrent states
    (batch, heads, dk, dv)."""
    import torch

    index = torch.tensor(list(rows), dtype=torch.long)

    def pick(value: Any) -> Any:
        return value.index_select(0, index.to(value.device)) if isinstance(value, torch.Tensor) else value

    twin = copy.copy(cache)
    twin.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        for name, value in vars(layer).items():
            picked = {k: pick(v) for k, v in value.items()} if isinstance(value, dict) else pick(value)
            setattr(part, name, picked)
        twin.layers.append(part)
    return twin


def _stack(parts: Sequence[Any], width: int) -> Any:
    """One cache of the rows of every part, in order, attention rows right-padded to `width`."""
    import torch
    import torch.nn.functional as F

    def join(values: list[Any], pad: bool) -> Any:
        if not isinstance(values[0], torch.Tensor):
            return values[0]
        if pad:
            values = [F.pad(v, (0, 0, 0, width - v.shape[-2])) for v in values]
        return torch.cat(values, dim=0)

    twin = copy.copy(parts[0])
    twin.layers = []
    for n, layer in enumerate(parts[0].layers):
        growing = _append_only(layer)
        merged = copy.copy(layer)
        for name, value in vars(layer).items():
            values = [vars(p.layers[n])[name] for p in parts]
            if isinstance(value, dict):
                joined: Any = {k: join([v[k] for v in values], False) for k in value}
            else:
                joined = join(values, name in growing)
            setattr(merged, name, joined)
        twin.layers.append(merged)
    return twin


def _append_only(layer: Any) -> tuple[str, ...]:
    """Attributes of a cache layer that only ever grow by torch.cat along the sequence axis."""
    from transformers.cache_utils import DynamicLayer

    update = getattr(type(layer), "update", None)
    if isinstance(layer, DynamicLayer) and update is DynamicLayer.update:
        return ("keys", "values")
    return ()


def _encode(value: Any, key: str, tensors: dict[str, Any], torch: Any) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"tensor": key}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": True}
    if isinstance(value, dict):
        return {"dict": [[k, _encode(v, f"{key}.{k}", tensors, torch)] for k, v in value.items()]}
    if value is None or isinstance(value, bool | int | float | str):
        return {"value": value}
    raise TypeError(f"cannot serialise cache attribute {key} of type {type(value).__name__}")


# The dtypes a cache attribute may name: a saved name reaches `getattr(torch, ...)` only from here.
_DTYPES = frozenset(
    {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}
)


def _decode(value: Any, tensors: dict[str, Any], torch: Any, device: Any) -> Any:
    """One saved cache attribute; anything but the forms `_encode` writes is a ValueError."""
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError(f"bad cache attribute {str(value)[:80]}")
    ((kind, payload),) = value.items()
    if kind == "tensor" and isinstance(payload, str) and payload in tensors:
        return tensors[payload].to(device)
    if kind == "dtype" and payload in _DTYPES:
        return getattr(torch, payload)
    if kind == "device" and payload is True:
        return device
    if kind == "dict" and isinstance(payload, list):
        pairs = [p for p in payload if isinstance(p, list) and len(p) == 2 and isinstance(p[0], int | str)]
        if len(pairs) != len(payload):
            raise ValueError(f"bad cache attribute {str(value)[:80]}")
        return {k: _decode(v, tensors, torch, device) for k, v in pairs}
    if kind == "value" and (payload is None or isinstance(payload, bool | int | float | str)):
        return payload
    raise ValueError(f"bad cache attribute {str(value)[:80]}")


def _check_tensors(
    tensors: dict[str, Any],
    layout: dict[str, Any],
    tokens: int,
    template: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    """Every tensor the model's own cache has, with its dtype and shape (attention rows as many
    as the header's tokens), finite, and the layers' layout the same as the model's."""
    import torch

    shapes, meta = template
    if _signature(layout) != _signature(meta) or set(layout["growing"]) != set(meta["growing"]):
        raise ValueError("the snapshot's cache layout is not this model's")
    if set(tensors) != set(shapes):
        raise ValueError("the snapshot holds other tensors than this model's cache")
    growing = set(meta["growing"])
    for key, t in tensors.items():
        dtype, shape = shapes[key]
        want = (*shape[:-2], tokens, shape[-1]) if key in growing else shape
        if t.dtype != dtype or tuple(t.shape) != want:
            raise ValueError(f"tensor {key} is {t.dtype} {tuple(t.shape)}, expected {dtype} {want}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor {key} holds values that are not finite")


def _signature(value: Any) -> Any:
    """A cache layout with the plain values replaced by their types: what must match a model's."""
    if isinstance(value, dict):
        if set(value) == {"value"}:
            return ("value", type(value["value"]).__name__)
        return {k: _signature(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_signature(v) for v in value]
    return value


_TEMPLATES: weakref.WeakKeyDictionary[Any, tuple[dict[str, Any], dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


def _template(engine: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dtype and shape of every tensor, layout) of the model's cache after one token: what a
    loaded snapshot is checked against. Computed once per engine."""
    if engine not in _TEMPLATES:
        cache = engine.new_cache()
        engine.advance(cache, [0])
        tensors, meta = engine.cache_to_tensors(cache)
        _TEMPLATES[engine] = ({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, meta)
    return _TEMPLATES[engine]


def _apply_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        try:
            return str(
                tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
                )
            )
        except TypeError:
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return transcript(messages)  # a base model without a chat template


def _context_length(model: Any, tokenizer: Any) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**8 else None


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(s) for s in source)
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return ids


# Loading


def load_tiny(name: str) -> HFEngine:
    from . import tiny

    prepare_torch(torch_device())
    model, tokenizer = tiny.build(name)
    fingerprint = _fingerprint(model.config, "tiny", name, str(tiny.SEED), tiny.weights_hash(model))
    model.to(torch_device())
    return HFEngine(model, tokenizer, id=f"tiny:{name}", fingerprint=fingerprint, label="random weights")


def load_pretrained(target: str) -> HFEngine:
    """Load `target` (a local directory or a hub repo id) with AutoModelForCausalLM."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_parts(
        target,
        AutoModelForCausalLM,
        hint="point at a local copy with --model hf:/path/to/dir, or try the pipeline with a "
        "random-weights model: --model tiny:qwen3.5",
    )
    where = _model_folder(target, model)
    files = _weight_files(where) if where is not None else []
    # A hub snapshot folder is named by its commit: part of the identity (a local folder's name is not).
    revision = where.name if where is not None and where.parent.name == "snapshots" else ""
    fingerprint = _fingerprint(model.config, "hf", revision, *files)
    return HFEngine(model, tokenizer, id=f"hf:{target}", fingerprint=fingerprint)


def load_parts(target: str, model_class: Any, *extra_classes: Any, hint: str) -> tuple[Any, ...]:
    """(model, tokenizer, one object per extra Auto class) of `target`, a local directory or a hub
    repo id; the model on linmem's device and dtype, in eval mode.

    Prefers local files; goes to the hub only when the model is not cached and the hub answers,
    and otherwise says exactly how to get the model (ending with `hint`) instead of retrying for
    a minute."""
    device = torch_device()
    prepare_torch(device)
    import torch
    from transformers import AutoTokenizer

    path = Path(target).expanduser()
    local = path.is_dir()
    source = str(path) if local else target
    if local and not (path / "config.json").is_file():
        raise ModelUnavailable(f"{path} is a directory but has no config.json: not a transformers model")
    dtype = getattr(torch, os.environ.get("LINMEM_DTYPE") or ("float32" if device == "cpu" else "bfloat16"))

    def load(**where: Any) -> tuple[Any, ...]:
        tokenizer = AutoTokenizer.from_pretrained(source, **where)
        extras = tuple(c.from_pretrained(source, **where) for c in extra_classes)
        return (model_class.from_pretrained(source, dtype=dtype, **where), tokenizer, *extras)

    try:
        parts = load(local_files_only=True)
    except (OSError, ValueError) as first:
        if local or not _hub_reachable():
            raise ModelUnavailable(_unavailable_message(target, first, hint)) from None
        try:
            parts = load()
        except (OSError, ValueError) as second:
            raise ModelUnavailable(_unavailable_message(target, second, hint)) from None
    parts[0].to(torch.device(device))
    parts[0].eval()
    return parts


def _unavailable_message(target: str, error: Exception, hint: str) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"cannot load model {target!r} offline ({reason}). "
        f"Get it on a machine with internet access with `hf download {target}` (it lands in "
        f"~/.cache/huggingface; copy that folder here, or set HF_HOME), or {hint}"
    )


def _hub_reachable(timeout: float = 2.0) -> bool:
    if (
        os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "TRUE")
        or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
    ):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _model_folder(target: str, model: Any) -> Path | None:
    """The folder the weights were read from: a local directory as given, or for a hub id the
    cache's snapshot folder that `refs/main` resolved to, named by its commit. Its files then
    fingerprint the weights, so a new revision of a hub model rebuilds its snapshots."""
    where = Path(str(model.name_or_path or ""))
    if where.is_dir():
        return where
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(target, local_files_only=True))
    except Exception:  # not in the cache under that id: there are no weight files to hash
        return None


def _weight_files(directory: Path) -> list[str]:
    """Name, size and a sampled content hash of each weight file: cheap to compute at load time,
    and different whenever the weights are."""
    out = []
    for f in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        h = hashlib.sha256()
        size = f.stat().st_size
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
        out.append(f"{f.name}:{size}:{h.hexdigest()}")
    return out


def _fingerprint(config: Any, *parts: str) -> str:
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for p in parts:
        h.update(b"\0" + p.encode())
    return h.hexdigest()
