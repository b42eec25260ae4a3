"""Who turns a clip into text: captioners (frames to a caption) and transcribers (speech to text).

Chosen by spec, like the LM reader's models:

- ``hf:REPO_OR_PATH``: a local transformers vision-language model (Qwen3.5 is natively multimodal;
  the default is ``hf:Qwen/Qwen3.5-0.8B``), loaded with AutoModelForImageTextToText.
- ``openai:URL#MODEL``: any OpenAI-compatible chat endpoint that takes images; frames travel as
  ``data:image/jpeg;base64`` URLs.
- ``tiny:qwen3.5-vl``: a tiny random-weights Qwen3.5 with a vision tower, for tests.

Transcribers are ``openai:URL#MODEL``: an OpenAI-compatible ``/v1/audio/transcriptions``
endpoint (OpenAI's Whisper API, a vLLM or whisper.cpp server); without ``#MODEL``, ``whisper-1``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from .. import _spec
from .._http import OpenAIClient
from ..engines.base import strip_think
from ..errors import EngineError, ModelUnavailable

DEFAULT_CAPTIONER = "hf:Qwen/Qwen3.5-0.8B"
DEFAULT_TRANSCRIPTION_MODEL = "whisper-1"
CAPTIONER_FORMS = _spec.Forms(
    "captioner", {"hf": "hf:REPO_OR_PATH", "openai": "openai:URL#MODEL", "tiny": "tiny:qwen3.5-vl"}
)
TRANSCRIBER_FORMS = _spec.Forms(
    "transcriber", {"openai": "openai:URL#MODEL (an /audio/transcriptions server)"}
)


@runtime_checkable
class Captioner(Protocol):
    id: str

    def caption(self, frames: Sequence[bytes], prompt: str, *, max_new_tokens: int) -> str:
        """The model's text for JPEG `frames` (in time order) followed by `prompt`."""
        ...


@runtime_checkable
class Transcriber(Protocol):
    id: str

    def transcribe(self, wav: bytes) -> str:
        """The speech in a WAV file, as text ("" when there is none)."""
        ...


def load_captioner(spec: str | None = None) -> Captioner:
    spec = spec or DEFAULT_CAPTIONER
    parsed = CAPTIONER_FORMS.parse(spec)
    if parsed.scheme == "openai":
        return OpenAICaptioner(parsed.target)
    if parsed.scheme == "hf":
        from ..engines import check_local_path

        check_local_path(parsed.target, "--captioner hf:/path/to/dir")
        return HFCaptioner.load(parsed.target)
    if parsed.target != "qwen3.5-vl":  # the only tiny model with a vision tower
        raise CAPTIONER_FORMS.refuse(spec)
    from ..engines import tiny
    from ..engines.hf import prepare_torch, torch_device

    prepare_torch(torch_device())
    model, tokenizer, images = tiny.build_vlm()
    return HFCaptioner(model.to(torch_device()), tokenizer, images, id=str(parsed))


def load_transcriber(spec: str) -> Transcriber:
    parsed = TRANSCRIBER_FORMS.parse(spec)
    url, model = _spec.endpoint(
        parsed.target, need_model=False, refuse=lambda why: TRANSCRIBER_FORMS.refuse(spec, why)
    )
    return OpenAITranscriber(url, model or DEFAULT_TRANSCRIPTION_MODEL)


class OpenAICaptioner:
    """Frames as image parts of one user message to an OpenAI-compatible chat endpoint."""

    def __init__(self, target: str) -> None:
        from ..engines.openai import OpenAIEngine

        self._engine = OpenAIEngine.from_spec(target)
        self.id = f"openai:{self._engine.model}@{self._engine.base_url}"

    def caption(self, frames: Sequence[bytes], prompt: str, *, max_new_tokens: int) -> str:
        parts: list[dict[str, Any]] = [
            {
                "type": "image_url",
                "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(f).decode()},
            }
            for f in frames
        ]
        parts.append({"type": "text", "text": prompt})
        return self._engine.chat([{"role": "user", "content": parts}], max_new_tokens=max_new_tokens).text


class HFCaptioner:
    """A transformers vision-language model, greedy.

    The image placeholders are expanded here (one per merged patch, as the model's processor
    would) so that only the image processor is needed: Qwen's full processor also wants a video
    processor, which needs torchvision, a large install that captioning frames does not use.
    """

    def __init__(self, model: Any, tokenizer: Any, images: Any, *, id: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.images = images
        self.id = id
        image_id = getattr(model.config, "image_token_id", None)
        if not isinstance(image_id, int):
            raise ModelUnavailable(f"{id} is not a vision-language model (its config has no image_token_id)")
        self._image_token = tokenizer.convert_ids_to_tokens(image_id)
        self._merge = int(getattr(images, "merge_size", 2))

    @classmethod
    def load(cls, target: str) -> HFCaptioner:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText

        from ..engines.hf import load_parts

        model, tokenizer, images = load_parts(
            target,
            AutoModelForImageTextToText,
            AutoImageProcessor,
            hint="point at a local copy with --captioner hf:/path/to/dir, use an endpoint: "
            "--captioner openai:URL#MODEL, or try the pipeline with a random-weights model: "
            "--captioner tiny:qwen3.5-vl",
        )
        return cls(model, tokenizer, images, id=f"hf:{target}")

    def caption(self, frames: Sequence[bytes], prompt: str, *, max_new_tokens: int) -> str:
        import torch
        from PIL import Image

        pictures = [Image.open(io.BytesIO(f)).convert("RGB") for f in frames]
        content: list[dict[str, Any]] = [{"type": "image"} for _ in pictures]
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
        except TypeError:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs: dict[str, Any] = {}
        if pictures:
            inputs.update(self.images(images=pictures, return_tensors="pt"))
            text = self._expand(str(text), inputs["image_grid_thw"].prod(-1).tolist())
        inputs.update(self.tokenizer(str(text), return_tensors="pt", add_special_tokens=False))
        device = self.model.device
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        return strip_think(self.tokenizer.decode(new, skip_special_tokens=True)).strip()

    def _expand(self, text: str, patches: list[int]) -> str:
        pieces = text.split(self._image_token)
        if len(pieces) - 1 != len(patches):
            raise EngineError(
                f"{self.id}: the chat template placed {len(pieces) - 1} image placeholders for "
                f"{len(patches)} frames"
            )
        per_image = [self._image_token * (n // self._merge**2) for n in patches]
        return pieces[0] + "".join(tokens + rest for tokens, rest in zip(per_image, pieces[1:], strict=True))


class OpenAITranscriber:
    """``POST {base_url}/audio/transcriptions`` with the clip's WAV as a multipart upload.

    `api_key`, `retries` and `backoff_s` are those of `linmem._http.OpenAIClient`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        retries: int = 2,
        backoff_s: float = 0.5,
    ) -> None:
        self.base_url = _spec.base_url(base_url)
        self.model = model
        self._http = OpenAIClient(
            self.base_url, api_key=api_key, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s
        )
        self.id = f"openai:{model}@{self.base_url}"

    def close(self) -> None:
        self._http.close()

    def transcribe(self, wav: bytes) -> str:
        url = f"{self.base_url}/audio/transcriptions"
        resp = self._http.post_multipart(
            url,
            files={"file": ("clip.wav", wav, "audio/wav")},
            fields={"model": self.model, "response_format": "json"},
        ).response
        if resp.is_error:
            raise EngineError(f"POST {url}: HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            text = resp.json()["text"]
        except (ValueError, KeyError, TypeError) as e:
            raise EngineError(f"POST {url}: unexpected answer, no 'text' in {resp.text[:300]}") from e
        return str(text).strip()
