"""llama.cpp engine: GGUF models (quantized, on CPUs and laptops) with exact state snapshots.

The memory's state is llama.cpp's own per-sequence state (`llama_state_seq_get_data` /
`set_data`): attention keys and values for attention layers, recurrent and conv states for
Mamba, RWKV, Gated DeltaNet and KDA layers. linmem keeps it as a snapshot and never relies on
llama.cpp's implicit prompt cache (which falls back to a full re-prefill on hybrid models).

One llama.cpp context holds one sequence at a time. A *state* (`LlamaState`) is either bytes
saved from the context, or the sequence the context holds now (it is the context's owner); a
state that needs the context while another owns it gets it by a restore, after the owner, if
still alive, has been saved. So a read restores the memory's state once (a memory copy, no
model work) and then runs only its question. Prompts are tokenised in the same pieces as by the
transformers engine, so a snapshot read and a stateless read run the same ids.

Specs: ``gguf:/path/to/model.gguf``, or ``gguf:NAME`` looked up by file name in
``$LINMEM_MODELS`` (default ``~/.cache/linmem-models``), ollama's model store and the Hugging Face
cache (see `resolve`).
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ContextOverflow, ModelUnavailable
from . import _gguf
from .base import LocalEngine, strip_think, threads, transcript

# Tokens per llama_decode call in a prefill (llama.cpp's own default batch).
BATCH = 512
# The fewest tokens a prefill call runs (when it has them): below 8, llama.cpp's CPU matmuls take
# another path whose results differ in the last bits, so a state continued by a few tokens would
# not equal the same tokens read in one pass (see `_windows` and `ChatSession`).
MIN_WINDOW = 8
# Context allocated when the model allows more; `$LINMEM_CONTEXT` sets it (KV memory is reserved
# up front for the whole context, so a 262k-token model would otherwise take GBs at load).
DEFAULT_CONTEXT = 32768
INSTALL_HINT = (
    "the llama.cpp engine needs llama-cpp-python: pip install 'linmem[gguf]' "
    "(where a prebuilt wheel is at hand: pip install --find-links DIR llama-cpp-python==0.3.36)"
)


def _llama() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise ModelUnavailable(INSTALL_HINT) from None
    problem = unusable()
    if problem:
        raise ModelUnavailable(problem)
    # The binding prints every llama.cpp log line unless its logger says otherwise; linmem
    # reports load failures in its own words.
    logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)
    return llama_cpp


_PROBE = "import llama_cpp; llama_cpp.llama_backend_init()"
_probed: list[str | None] = []


def unusable() -> str | None:
    """Why the installed llama.cpp cannot run on this CPU, or None when it can.

    A binding built with `-march=native` on a newer CPU (AVX-512) dies at its first call on an
    older one (AVX2) with an illegal instruction, which no Python code can catch; so the first
    use in a process asks a child process to start llama.cpp first (about 0.3 s, once)."""
    if not _probed:
        try:
            import llama_cpp
        except ImportError:
            _probed.append(INSTALL_HINT)
            return _probed[0]
        try:
            done = subprocess.run(
                [sys.executable, "-c", _PROBE], capture_output=True, timeout=120, check=False
            )
        except subprocess.TimeoutExpired:
            _probed.append(f"llama-cpp-python {llama_cpp.__version__}: starting llama.cpp took over 120 s")
            return _probed[0]
        # Killed by a signal: negative, or 128 + the signal when a shell sits in between.
        sig = -done.returncode if done.returncode < 0 else done.returncode - 128
        if done.returncode < 0 or sig == signal.SIGILL:
            why = "an illegal instruction" if sig == signal.SIGILL else f"signal {sig}"
            _probed.append(
                f"llama-cpp-python {llama_cpp.__version__} ({Path(llama_cpp.__file__).parent}) dies with "
                f"{why} on this CPU: it was built for another one (a wheel made with -march=native on "
                "an AVX-512 machine, run on an AVX2 one). Build it here: pip install --force-reinstall "
                f"--no-deps --no-binary llama-cpp-python llama-cpp-python=={llama_cpp.__version__}"
            )
        else:
            _probed.append(None)
    return _probed[0]


# Finding model files


def model_dirs() -> list[Path]:
    """Where `gguf:NAME` looks, in order."""
    home = Path.home()
    hf = Path(
        os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", home / ".cache/huggingface")) / "hub"
    )
    ollama = Path(os.environ.get("OLLAMA_MODELS", home / ".ollama/models"))
    return [Path(os.environ.get("LINMEM_MODELS") or home / ".cache/linmem-models"), ollama, hf]


def local_models() -> dict[str, Path]:
    """Every GGUF model found in `model_dirs`, by name (file name without .gguf; for ollama
    `model:tag`), first found first."""
    found: dict[str, Path] = {}
    linmem, ollama, hf = model_dirs()
    for f in sorted(linmem.glob("*.gguf")) if linmem.is_dir() else []:
        found.setdefault(f.name.removesuffix(".gguf"), f)
    for name, f in _ollama_models(ollama):
        found.setdefault(name, f)
    for f in sorted(hf.glob("models--*/snapshots/*/**/*.gguf")) if hf.is_dir() else []:
        found.setdefault(f.name.removesuffix(".gguf"), f)
    return found


def _ollama_models(root: Path) -> list[tuple[str, Path]]:
    """(model:tag, blob) of each model in an ollama store: its manifests name the weights blob."""
    out = []
    manifests = root / "manifests"
    for m in sorted(manifests.glob("*/*/*/*")) if manifests.is_dir() else []:
        try:
            layers = json.loads(m.read_text())["layers"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for layer in layers if isinstance(layers, list) else []:
            if isinstance(layer, dict) and layer.get("mediaType") == "application/vnd.ollama.image.model":
                blob = root / "blobs" / str(layer.get("digest", "")).replace(":", "-")
                if blob.is_file():
                    name = (
                        m.parent.name
                        if m.parent.parent.name == "library"
                        else f"{m.parent.parent.name}/{m.parent.name}"
                    )
                    out.append((f"{name}:{m.name}", blob))
    return out


def resolve(target: str) -> Path:
    """The GGUF file `target` names: a path, or a model name found in `model_dirs` (exactly, else
    as the one name that starts with it, case ignored)."""
    path = Path(target).expanduser()
    if path.is_file() or path.suffix == ".gguf" or os.sep in target:
        if not path.is_file():
            raise ModelUnavailable(f"{path}: no such GGUF file")
        return path
    found = local_models()
    if target in found:
        return found[target]
    matches = [n for n in found if n.lower().startswith(target.lower())]
    if len(matches) == 1:
        return found[matches[0]]
    if matches:
        raise ModelUnavailable(f"gguf:{target} could be any of {', '.join(sorted(matches))}: name one")
    where = ", ".join(str(d) for d in model_dirs())
    have = f" Found: {', '.join(sorted(found))}." if found else ""
    raise ModelUnavailable(
        f"no GGUF model named {target!r} in {where}.{have} Get one with `ollama pull NAME`, "
        "`hf download REPO FILE.gguf`, or offline here with ../shared/models/get-models; "
        "or give its path: gguf:/path/to/model.gguf"
    )


# The engine


class LlamaState:
    """A sequence state of one `LlamaEngine`: the tokens it has read and its llama.cpp state
    bytes, which are None while the state lives only in the context (the context's owner)."""

    __slots__ = ("__weakref__", "blob", "n")

    def __init__(self, blob: bytes | None, n: int) -> None:
        self.blob = blob
        self.n = n


@dataclass(frozen=True)
class _Logits:
    """The last position's logits, as a numpy row."""

    row: Any


class LlamaEngine(LocalEngine):
    """A GGUF model run by llama.cpp, with the operations the state snapshots need (see
    `linmem.engines.base.StatefulEngine`)."""

    def __init__(self, path: Path, header: _gguf.Header, *, n_threads: int | None = None) -> None:
        llama_cpp = _llama()
        self._lib = llama_cpp
        self.path = path
        self.header = header
        self.id = f"gguf:{path.name.removesuffix('.gguf')}"
        self.label = ""
        self.architecture = header.architecture
        self.n_threads = n_threads or threads()
        self.min_window = MIN_WINDOW
        self.fingerprint = _gguf.fingerprint(header)
        self.config_hash = header.header_sha256
        self.versions = {"llama_cpp": str(llama_cpp.__version__)}
        self._model, self._ctx = _open(llama_cpp, path, header, self.n_threads)
        weakref.finalize(self, _close, llama_cpp, self._model, self._ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.context_length: int | None = int(llama_cpp.llama_n_ctx(self._ctx))
        self.recurrent = bool(llama_cpp.llama_model_is_recurrent(self._model))
        self.hybrid = bool(llama_cpp.llama_model_is_hybrid(self._model))
        self.attention = "linear hybrid" if self.hybrid else "recurrent" if self.recurrent else "softmax"
        self._batch = llama_cpp.llama_batch_init(BATCH, 0, 1)
        weakref.finalize(self, llama_cpp.llama_batch_free, self._batch)
        self._template = _chat_template(header, self._token_text)
        self._bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab)) and self._bos >= 0
        # The context's state: whose sequence it holds, and which saved bytes it equals (if any).
        self._lock = threading.RLock()
        self._owner: weakref.ref[LlamaState] | None = None
        self._content: bytes | None = b""
        self._split_cache: dict[tuple[str, str, str, str], tuple[str, str]] = {}

    def __repr__(self) -> str:
        return f"LlamaEngine({self.path}, {self.architecture}, {self.attention}, threads={self.n_threads})"

    # Prompt -> ids

    def render(self, messages: list[dict[str, str]]) -> str:
        return self._template(messages)

    def encode(self, text: str, *, specials: bool = True) -> list[int]:
        """Token ids of `text`, no BOS added. With `specials=False`, text that looks like a special
        token (a memory item quoting "<|im_end|>") stays plain text."""
        if not text:
            return []
        data = text.encode("utf-8", errors="surrogatepass")
        cap = len(data) + 8
        buf = (self._lib.llama_token * cap)()
        n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, False, specials)
        if n < 0:  # more tokens than bytes + 8 cannot happen, but the API allows asking again
            cap = -n
            buf = (self._lib.llama_token * cap)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, cap, False, specials)
        return list(buf[:n])

    def head_ids(self, head: str) -> list[int]:
        ids = self.encode(head)
        # A model that wants a BOS gets exactly one, whether or not its template writes it.
        return [self._bos, *ids] if self._add_bos and (not ids or ids[0] != self._bos) else ids

    def is_stop(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def decode(self, ids: Sequence[int]) -> str:
        return strip_think(self._detokenize(ids))

    def _detokenize(self, ids: Sequence[int], *, special: bool = False) -> str:
        buf = ctypes.create_string_buffer(256)
        out = bytearray()
        for t in ids:
            n = self._lib.llama_token_to_piece(self._vocab, int(t), buf, len(buf), 0, special)
            if n < 0:
                big = ctypes.create_string_buffer(-n)
                n = self._lib.llama_token_to_piece(self._vocab, int(t), big, len(big), 0, special)
                out += big.raw[:n]
            else:
                out += buf.raw[:n]
        return out.decode("utf-8", errors="replace")

    def _token_text(self, token: int) -> str:
        return self._detokenize([token], special=True) if token >= 0 else ""

    # States

    def new_cache(self) -> LlamaState:
        return LlamaState(b"", 0)

    def fork(self, cache: LlamaState) -> LlamaState:
        """A copy that can be advanced without touching `cache`: the state bytes are shared
        (immutable), so a fork of a saved state costs nothing."""
        with self._lock:
            if cache.blob is None:
                cache.blob = self._save()
            return LlamaState(cache.blob, cache.n)

    def advance(
        self,
        cache: LlamaState,
        ids: Sequence[int],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> _Logits:
        """Run `ids` on top of `cache` (updated in place); the logits after the last one."""
        if not ids:
            raise ValueError("advance() needs at least one token")
        with self._lock:
            self._check_room(cache.n + len(ids))
            self._activate(cache)
            for start, end in _windows(len(ids)):
                window = ids[start:end]
                self._decode(window, cache.n)
                cache.n += len(window)
                if progress is not None:
                    progress(len(window))
            return _Logits(self._last_logits())

    def greedy(
        self,
        cache: LlamaState,
        logits: _Logits,
        max_new_tokens: int,
        *,
        until: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        return self._decode_loop(cache, logits, max_new_tokens, lambda row: int(row.argmax()), until)

    def sample(
        self,
        cache: LlamaState,
        logits: _Logits,
        max_new_tokens: int,
        *,
        temperature: float,
        seed: int,
        until: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        import numpy as np

        rng = np.random.default_rng(seed)

        def pick(row: Any) -> int:
            z = row.astype(np.float64) / temperature
            p = np.exp(z - z.max())
            return int(rng.choice(len(p), p=p / p.sum()))

        return self._decode_loop(cache, logits, max_new_tokens, pick, until)

    def _decode_loop(
        self,
        cache: LlamaState,
        logits: _Logits,
        max_new_tokens: int,
        pick: Callable[[Any], int],
        until: Callable[[list[int]], bool] | None = None,
    ) -> list[int]:
        out: list[int] = []
        row = logits.row
        with self._lock:
            for _ in range(max_new_tokens):
                token = pick(row)
                if self.is_stop(token):
                    break
                out.append(token)
                if len(out) == max_new_tokens or cache.n >= (self.context_length or 0):
                    break
                if until is not None and until(out):
                    break
                row = self.advance(cache, [token]).row
        return out

    def state_bytes(self, cache: LlamaState) -> int:
        with self._lock:
            if cache.blob is None:
                return int(self._lib.llama_state_seq_get_size(self._ctx, 0))
            return len(cache.blob)

    def cache_to_tensors(self, cache: LlamaState) -> tuple[dict[str, Any], dict[str, Any]]:
        import torch

        with self._lock:
            blob = self.fork(cache).blob
        assert blob is not None
        tensor = (
            torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            if blob
            else torch.empty(0, dtype=torch.uint8)
        )
        return {"state": tensor}, {"layers": [{"llama.cpp": self.attention}], "growing": []}

    def cache_from_tensors(self, tensors: dict[str, Any], meta: dict[str, Any], tokens: int) -> LlamaState:
        """The saved state, checked by llama.cpp itself: it must accept the bytes for this model
        and then hold exactly `tokens` positions."""
        import torch

        if set(tensors) != {"state"} or meta != {"layers": [{"llama.cpp": self.attention}], "growing": []}:
            raise ValueError("the snapshot's layout is not a llama.cpp state of this model")
        t = tensors["state"]
        if t.dtype != torch.uint8 or t.dim() != 1 or tokens < 1 or tokens > (self.context_length or 0):
            raise ValueError(f"the snapshot's state is {t.dtype} {tuple(t.shape)} for {tokens} tokens")
        state = LlamaState(t.numpy().tobytes(), tokens)
        with self._lock:
            self._activate(state)  # restores, or raises ValueError
            last = int(self._lib.llama_memory_seq_pos_max(self._memory, 0))
        if last != tokens - 1:
            raise ValueError(f"the snapshot's state holds {last + 1} positions, its header says {tokens}")
        return state

    def _activate(self, state: LlamaState) -> None:
        """Make the context hold `state`'s sequence, saving the state it held if that is still in
        use. Caller holds the lock."""
        owner = self._owner() if self._owner is not None else None
        if owner is state:
            # A fork since the last advance saved bytes the context is about to move on from: a
            # later fork must save again, not hand out these.
            state.blob = None
            return
        if owner is not None and owner.blob is None:
            owner.blob = self._save()
        assert state.blob is not None, "a state without bytes is always the context's owner"
        if state.blob is not self._content:
            self._lib.llama_memory_clear(self._memory, True)
            if state.blob:
                self._restore(state.blob)
        self._owner = weakref.ref(state)
        self._content = state.blob
        state.blob = None  # the context is about to move on from the saved bytes

    def _save(self) -> bytes:
        size = int(self._lib.llama_state_seq_get_size(self._ctx, 0))
        buf = (ctypes.c_uint8 * size)()
        got = int(self._lib.llama_state_seq_get_data(self._ctx, buf, size, 0))
        if got != size:
            raise RuntimeError(f"llama.cpp saved {got} of {size} state bytes")
        data = bytes(buf)
        self._content = data
        return data

    def _restore(self, blob: bytes) -> None:
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if int(self._lib.llama_state_seq_set_data(self._ctx, buf, len(blob), 0)) != len(blob):
            self._lib.llama_memory_clear(self._memory, True)
            self._content = b""
            self._owner = None
            raise ValueError("llama.cpp refused the state bytes (made by another model or build)")

    def _decode(self, window: Sequence[int], pos: int) -> None:
        batch = self._batch
        batch.n_tokens = len(window)
        for i, token in enumerate(window):
            batch.token[i] = token
            batch.pos[i] = pos + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = False
        batch.logits[len(window) - 1] = True
        self._content = None  # the context now differs from every saved state
        rc = int(self._lib.llama_decode(self._ctx, batch))
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not run {len(window)} tokens at position {pos} (code {rc})")

    def _last_logits(self) -> Any:
        import numpy as np

        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _check_room(self, tokens: int) -> None:
        if self.context_length is not None and tokens > self.context_length:
            raise ContextOverflow(
                f"{tokens} tokens do not fit {self.id}'s context of {self.context_length} "
                "(set $LINMEM_CONTEXT up to the model's own limit, or read in windows)",
                needed=tokens,
                limit=self.context_length,
            )


def _windows(n: int) -> list[tuple[int, int]]:
    """[start, end) of the llama_decode calls for n prompt tokens: BATCH at a time, the last two
    evened out when the last would be shorter than MIN_WINDOW."""
    bounds = [(lo, min(n, lo + BATCH)) for lo in range(0, n, BATCH)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_WINDOW:
        (a, _), (_, end) = bounds[-2], bounds[-1]
        middle = end - MIN_WINDOW
        bounds[-2:] = [(a, middle), (middle, end)]
    return bounds


def _chat_template(
    header: _gguf.Header, token_text: Callable[[int], str]
) -> Callable[[list[dict[str, str]]], str]:
    """messages -> prompt text with the generation prompt, by the GGUF's own chat template (run
    in jinja's sandbox: a template is code from the file), or a plain transcript without one."""
    source = header.metadata.get("tokenizer.chat_template")
    if not isinstance(source, str) or not source.strip():
        return transcript
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def fail(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = fail
    template = env.from_string(source)
    tokens = {
        "bos_token": token_text(int(header.metadata.get("tokenizer.ggml.bos_token_id", -1))),
        "eos_token": token_text(int(header.metadata.get("tokenizer.ggml.eos_token_id", -1))),
    }

    def render(messages: list[dict[str, str]]) -> str:
        try:
            return template.render(
                messages=messages, add_generation_prompt=True, enable_thinking=False, **tokens
            )
        except TemplateError as e:
            raise ModelUnavailable(f"{header.path}: its chat template failed ({e})") from None

    return render


def _open(llama_cpp: Any, path: Path, header: _gguf.Header, n_threads: int) -> tuple[Any, Any]:
    """(model, context) of the file; ModelUnavailable naming the file and why not."""
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    # No repacked weight copies: with them a token's result depends on how many others share its
    # llama_decode call (Qwen2.5 Q4_K_M, AVX-512: logits 0.3 apart for the same ids cut at 31 or
    # 32), so a continued state would not equal a full read; without them every cut into calls
    # of 8 tokens or more gives the same bits, and prefill here was faster too (201 against 127
    # tok/s, 2 threads).
    mparams.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise ModelUnavailable(
            f"{path}: llama.cpp {llama_cpp.__version__} cannot load this GGUF (architecture "
            f"{header.architecture or 'not named'!r}): a newer llama-cpp-python may support it, "
            "or the file's tensors do not match its architecture"
        )
    trained = int(llama_cpp.llama_model_n_ctx_train(model)) or DEFAULT_CONTEXT
    want = os.environ.get("LINMEM_CONTEXT", "").strip()
    try:
        n_ctx = min(trained, int(want) if want else DEFAULT_CONTEXT)
    except ValueError:
        llama_cpp.llama_model_free(model)
        raise ModelUnavailable(f"LINMEM_CONTEXT must be a whole number of tokens, found {want!r}") from None
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = max(16, n_ctx)
    cparams.n_batch = cparams.n_ubatch = BATCH
    cparams.n_seq_max = 1
    # Flash attention off: on the CPU its results depend on how a prompt is cut into batches
    # (measured on SmolLM2: logits 1.07 apart for the same ids run as 1 or 3 calls), so a
    # snapshot read would not equal a full read. Without it the split changes nothing.
    cparams.flash_attn_type = 0
    cparams.n_threads = cparams.n_threads_batch = n_threads
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        llama_cpp.llama_model_free(model)
        raise ModelUnavailable(f"{path}: llama.cpp could not make a {n_ctx}-token context (out of memory?)")
    return model, ctx


def _close(llama_cpp: Any, model: Any, ctx: Any) -> None:
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


def load_gguf(target: str) -> LlamaEngine:
    """The engine for spec target `target` (a path or a model name, see `resolve`)."""
    path = resolve(target)
    if path.is_dir():
        raise ModelUnavailable(f"{path} is a folder: give the .gguf file inside it")
    header = _gguf.read_header(path)
    return LlamaEngine(path, header)


__all__ = ["LlamaEngine", "LlamaState", "load_gguf", "local_models", "model_dirs", "resolve"]
