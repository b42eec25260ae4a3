"""Memorization: videos (or pre-cut clips, or captions) into a memory, one item per clip.

A video is cut into fixed-length clips (clip i covers [i·L, i·L + L) seconds); each clip's frames
are sampled, its speech optionally transcribed, and a vision-language model captions it. Each
clip's item is written (one commit) as soon as it is captioned, so an interrupted ingest keeps
its finished clips, and the next run skips every (source, clip) the memory already holds: it
resumes and never duplicates. Every input is checked before anything is written: a file that is
not a video, an empty video or a missing ffmpeg stops the run with nothing written.

Inputs, told apart by what they are:

- a video file: source id = the file name without its suffix;
- a directory of pre-cut clips named ``0.mp4``, ``1.mp4``, … (M3-Agent's layout): source id = the
  directory name, clip i placed at [i·L, i·L + its duration);
- a captions JSON Lines file (``.jsonl``, see `linmem.video.captions`): source id = the file name
  without its suffix; no model is needed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from .. import prompts
from ..errors import BadInput, EngineError
from ..memory import Memory
from ..types import Item
from . import media
from .captioners import Captioner, Transcriber, load_captioner, load_transcriber
from .captions import caption_item, mmss, read_captions

_Looked = tuple[list[bytes], str | None]  # a clip's JPEG frames and its transcript
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv")


@dataclass(frozen=True, slots=True)
class Sampling:
    """How clips are cut and looked at: clip length, frame rate and count, frame size."""

    clip_seconds: float = 30.0
    fps: float = 1.0
    max_frames: int = 8
    max_side: int = 448

    def check(self) -> None:
        if self.clip_seconds <= 0:
            raise BadInput(f"clip length must be > 0 seconds, found {self.clip_seconds:g}")
        if self.fps <= 0:
            raise BadInput(f"frame rate must be > 0, found {self.fps:g}")
        if self.max_frames < 1:
            raise BadInput(f"max frames per clip must be >= 1, found {self.max_frames}")
        if self.max_side < 32:
            raise BadInput(f"frame size must be >= 32 pixels, found {self.max_side}")


@dataclass(frozen=True, slots=True)
class _Clip:
    index: int
    start: float  # on the source's timeline
    end: float
    file: Path  # where to decode it from
    span: media.Span  # the part of `file` to decode
    has_audio: bool


@dataclass
class _Source:
    source: str
    path: Path
    kind: str  # "video", "clips" or "captions"
    clips: list[_Clip] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)

    @property
    def indices(self) -> list[int]:
        if self.kind == "captions":
            return sorted({i.clip for i in self.items if i.clip is not None})
        return [c.index for c in self.clips]


@dataclass(frozen=True, slots=True)
class SourceReport:
    """What one input became: its clips, how many were written now and how many were already there."""

    source: str
    path: str
    kind: str
    clips: int
    written: int
    skipped: int

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def ingest(
    memory: Memory,
    paths: Sequence[str | Path],
    *,
    captioner: str | Captioner | None = None,
    transcriber: str | Transcriber | None = None,
    sampling: Sampling = Sampling(),
    max_new_tokens: int = 256,
    progress: Callable[[int], None] | None = None,
) -> list[SourceReport]:
    """Write every input's clips into `memory`, skipping clips it already holds.

    `captioner` and `transcriber` are specs or objects; the captioner (default
    ``hf:Qwen/Qwen3.5-0.8B``) is loaded only if some clip needs a caption. `progress` is called
    with the number of clips to caption once, before the first, then with 1 after each.
    """
    sampling.check()
    sources = plan(paths, sampling)
    done = _present(memory, sources, sampling)
    to_caption = sum(
        1 for s in sources if s.kind != "captions" for c in s.clips if c.index not in done[s.source]
    )
    if progress is not None:
        progress(to_caption)
    cap: Captioner | None = None
    ear = load_transcriber(transcriber) if isinstance(transcriber, str) else transcriber
    reports = []
    for src in sources:
        present = done[src.source]
        written = 0
        if src.kind == "captions":
            fresh = [i for i in src.items if i.clip not in present]
            if fresh:  # one commit: a captions file goes in whole or not at all
                memory.write([replace(i, meta=i.meta | {"ingest": "captions"}) for i in fresh])
            written = len({i.clip for i in fresh})
        else:
            pending = [c for c in src.clips if c.index not in present]
            looks = _one_ahead(pending, partial(_look, src, transcriber=ear, sampling=sampling))
            for clip, looked in looks:
                if cap is None:
                    cap = (
                        load_captioner(captioner)
                        if captioner is None or isinstance(captioner, str)
                        else captioner
                    )
                memory.write([_describe(src, clip, looked, cap, ear, sampling, max_new_tokens)])
                written += 1
                if progress is not None:
                    progress(1)
        total = len(src.indices)
        reports.append(SourceReport(src.source, str(src.path), src.kind, total, written, total - written))
    return reports


def plan(paths: Sequence[str | Path], sampling: Sampling = Sampling()) -> list[_Source]:
    """Every input checked and cut into clips, before anything is written."""
    if not paths:
        raise BadInput("nothing to ingest: give video files, clip directories or captions .jsonl files")
    sources: list[_Source] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            src = _clip_dir(path, sampling)
        elif path.suffix.lower() == ".jsonl":
            src = _Source(path.stem, path, "captions", items=read_captions(path, path.stem))
        else:
            src = _video(path, sampling)
        clash = next((s for s in sources if s.source == src.source), None)
        if clash is not None:
            raise BadInput(f"{path} and {clash.path} would both be source {src.source!r}: rename one")
        sources.append(src)
    return sources


def _video(path: Path, sampling: Sampling) -> _Source:
    info = media.probe(path)
    clips = [
        _Clip(s.index, s.start, s.end, path, s, info.has_audio)
        for s in media.spans(info.duration, sampling.clip_seconds)
    ]
    return _Source(path.stem, path, "video", clips=clips)


def _clip_dir(path: Path, sampling: Sampling) -> _Source:
    files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise BadInput(f"{path}: a clip directory needs video files named 0.mp4, 1.mp4, …; found none")
    bad = [f.name for f in files if not re.fullmatch(r"\d+", f.stem)]
    if bad:
        raise BadInput(
            f"{path}: clip files must be named by their index (0.mp4, 1.mp4, …), found {bad[:3]}; "
            f"to ingest whole videos, name the files instead (linmem ingest {path}/*.mp4)"
        )
    seen: dict[int, Path] = {}
    clips = []
    for f in files:
        index = int(f.stem)
        if index in seen:
            raise BadInput(f"{path}: clip {index} twice ({seen[index].name} and {f.name})")
        seen[index] = f
        info = media.probe(f)
        start = index * sampling.clip_seconds
        clips.append(
            _Clip(
                index, start, start + info.duration, f, media.Span(index, 0.0, info.duration), info.has_audio
            )
        )
    return _Source(path.name, path, "clips", clips=sorted(clips, key=lambda c: c.index))


def _present(memory: Memory, sources: list[_Source], sampling: Sampling) -> dict[str, set[int]]:
    """The clips each source already has in the memory; refuses a source cut differently before."""
    wanted = {s.source: s for s in sources}
    done: dict[str, set[int]] = {name: set() for name in wanted}
    for item in memory.items():
        if item.source not in wanted or item.clip is None:
            continue
        before = item.meta.get("clip_seconds")
        if wanted[item.source].kind != "captions" and before is not None and before != sampling.clip_seconds:
            raise BadInput(
                f"memory {memory.name!r} holds {item.source!r} cut into {before:g} s clips; ingest it "
                f"with --clip-seconds {before:g}, or into another memory"
            )
        done[item.source].add(item.clip)
    return done


def _one_ahead(clips: list[_Clip], look: Callable[[_Clip], _Looked]) -> Iterator[tuple[_Clip, _Looked]]:
    """(clip, look(clip)) in order, with the next clip's `look` (ffmpeg, a transcription request)
    running on a worker thread while the caller captions this one."""
    if not clips:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="linmem-ffmpeg") as pool:
        ahead = pool.submit(look, clips[0])
        for clip, following in zip(clips, [*clips[1:], None], strict=True):
            looked = ahead.result()
            if following is not None:
                ahead = pool.submit(look, following)
            yield clip, looked


def _look(src: _Source, clip: _Clip, transcriber: Transcriber | None, sampling: Sampling) -> _Looked:
    """A clip's frames, and its speech as text when there is a transcriber and a sound track."""
    frames = media.frames(
        clip.file, clip.span, fps=sampling.fps, max_frames=sampling.max_frames, max_side=sampling.max_side
    )
    if not frames:
        raise BadInput(f"{_where(src, clip)}: ffmpeg decoded no frames")
    transcript = None
    if transcriber is not None and clip.has_audio:
        transcript = transcriber.transcribe(media.audio(clip.file, clip.span))
    return frames, transcript


def _where(src: _Source, clip: _Clip) -> str:
    return f"{src.path} clip {clip.index} ({mmss(clip.start)}-{mmss(clip.end)})"


def _describe(  # noqa: PLR0917 - private, called once
    src: _Source, clip: _Clip, looked: _Looked, captioner: Captioner,
    transcriber: Transcriber | None, sampling: Sampling, max_new_tokens: int,
) -> Item:  # fmt: skip
    frames, transcript = looked
    where = _where(src, clip)
    prompt = prompts.caption_prompt(clip.index, mmss(clip.start), mmss(clip.end), len(frames), transcript)
    caption = captioner.caption(frames, prompt, max_new_tokens=max_new_tokens).strip()
    if not caption:
        raise EngineError(f"{where}: {captioner.id} returned an empty caption; rerun to retry this clip")
    meta: dict[str, object] = {
        "clip_seconds": sampling.clip_seconds,
        "frames": len(frames),
        "captioner": captioner.id,
        "ingest": src.kind,
    }
    if transcriber is not None:
        meta["transcriber"] = transcriber.id
        meta["transcript"] = transcript or ""
    return caption_item(
        clip.index, caption, source=src.source, start=round(clip.start, 3), end=round(clip.end, 3),
        transcript=transcript, meta=meta,
    )  # fmt: skip
