"""Memorization: videos (or pre-cut clips, or captions) into a memory, one item per clip.

A video is cut into fixed-length clips (clip i covers [i·L, i·L + L) seconds); each clip's frames
are sampled, its speech optionally transcribed, and a vision-language model captions it. Each
clip's item is written (one commit) as soon as it is captioned, so an interrupted ingest keeps
its finished clips, and the next run skips every clip of the same input the memory already
holds: it resumes and never duplicates. Every input is checked before anything is written: a
file that is not a video, an empty video or a missing ffmpeg stops the run with nothing written.

Inputs, told apart by what they are:

- a video file: source = the file name without its suffix;
- a directory of pre-cut clips named ``0.mp4``, ``1.mp4``, … (M3-Agent's layout): source = the
  directory name, clip i placed at [i·L, i·L + its duration);
- a captions JSON Lines file (``.jsonl``, see `linmem.video.captions`): source = the file name
  without its suffix; no model is needed.

An input is identified by its content, not its name: every item records the SHA-256 of its input
in ``meta["source_key"]``, and a clip counts as done only for the input with that key, so
``day2/cam.jsonl`` after ``day1/cam.jsonl`` is ingested too. When the memory already holds
another input's items under the name, the new one is named ``<name>-<first 8 hex digits of its
key>`` so that sources stay apart. Items written before keys were recorded have no key; they
still count as done for the input of their name, as they did then.

One ingest at a time writes to a memory: an ingest holds an exclusive lock on the memory's
``ingest.lock`` from reading what is done to its last write, and a second one (another process)
waits for it, then resumes, writing nothing twice.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache, partial
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
SOURCE_KEY = "source_key"  # item meta: "sha256:<hex>" of the input the item came from
LOCK_FILE = "ingest.lock"  # in the memory's folder


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
    source: str  # the name items carry; `_present` may rename it to keep sources apart
    path: Path
    kind: str  # "video", "clips" or "captions"
    key: str  # the content's identity, SOURCE_KEY
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
    with _ingest_lock(memory):  # what is done is read under the lock, so a waiting ingest resumes
        done = _present(memory, sources, sampling)
        to_caption = sum(
            1 for s in sources if s.kind != "captions" for c in s.clips if c.index not in done[s.key]
        )
        if progress is not None:
            progress(to_caption)
        ear = load_transcriber(transcriber) if isinstance(transcriber, str) else transcriber
        cap = cache(partial(_captioner, captioner))  # loaded on the first clip that needs it
        reports = []
        for src in sources:
            if src.kind == "captions":
                written = _write_captions(memory, src, done[src.key])
            else:
                written = _caption_clips(
                    memory, src, done[src.key], captioner=cap, transcriber=ear, sampling=sampling,
                    max_new_tokens=max_new_tokens, progress=progress,
                )  # fmt: skip
            total = len(src.indices)
            reports.append(SourceReport(src.source, str(src.path), src.kind, total, written, total - written))
    return reports


def _write_captions(memory: Memory, src: _Source, present: set[int]) -> int:
    """Write a captions file's clips not `present`, with the file's name and key."""
    fresh = [i for i in src.items if i.clip not in present]
    if fresh:  # one commit: a captions file goes in whole or not at all
        meta = {"ingest": "captions", SOURCE_KEY: src.key}
        memory.write([replace(i, source=src.source, meta=i.meta | meta) for i in fresh])
    return len({i.clip for i in fresh})


def _captioner(spec: str | Captioner | None) -> Captioner:
    return load_captioner(spec) if spec is None or isinstance(spec, str) else spec


def _caption_clips(
    memory: Memory, src: _Source, present: set[int], *, captioner: Callable[[], Captioner],
    transcriber: Transcriber | None, sampling: Sampling, max_new_tokens: int,
    progress: Callable[[int], None] | None,
) -> int:  # fmt: skip
    """Caption and write, one commit each, the clips of a video or clip folder not `present`."""
    written = 0
    pending = [c for c in src.clips if c.index not in present]
    looks = _one_ahead(pending, partial(_look, src, transcriber=transcriber, sampling=sampling))
    for clip, looked in looks:
        item = _describe(src, clip, looked, captioner(), transcriber, sampling, max_new_tokens)
        memory.write([item])
        written += 1
        if progress is not None:
            progress(1)
    return written


@contextmanager
def _ingest_lock(memory: Memory) -> Iterator[None]:
    """Hold `memory`'s ingest lock (an exclusive `flock`, across processes), waiting for another
    ingest that holds it, with a message, rather than failing: the wait ends in a resume."""
    if sys.platform == "win32":  # no flock; concurrent ingests into one memory are the user's to avoid
        yield
        return
    import fcntl

    fd = os.open(memory.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"linmem ingest: another ingest into memory {memory.name!r} is running; waiting for it "
                "to finish, then resuming after it",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


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
            items = read_captions(path, path.stem)
            src = _Source(path.stem, path, "captions", _digest(path), items=items)
        else:
            src = _video(path, sampling)
        clash = next((s for s in sources if s.key == src.key), None)
        if clash is not None:
            raise BadInput(f"{path} and {clash.path} have the same content: give it once")
        sources.append(src)
    return sources


def _digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks. Videos are hashed whole too: at hundreds of MB a
    second it costs seconds for an hour of video, against minutes of captioning, and a sampled
    hash could take two recordings with equal headers for one."""
    try:
        with path.open("rb") as f:
            return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None


def _video(path: Path, sampling: Sampling) -> _Source:
    info = media.probe(path)
    clips = [
        _Clip(s.index, s.start, s.end, path, s, info.has_audio)
        for s in media.spans(info.duration, sampling.clip_seconds)
    ]
    return _Source(path.stem, path, "video", _digest(path), clips=clips)


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
    clips.sort(key=lambda c: c.index)
    # The folder's identity is that of its clips, in order, whatever the folder is called.
    manifest = "".join(f"{c.index} {_digest(c.file)}\n" for c in clips)
    key = "sha256:" + hashlib.sha256(manifest.encode()).hexdigest()
    return _Source(path.name, path, "clips", key, clips=clips)


@dataclass
class _Held:
    """Items a memory holds of one input: their clips and the clip lengths they were cut at."""

    clips: set[int] = field(default_factory=set)
    cuts: set[float] = field(default_factory=set)

    def add(self, clip: int, seconds: Any) -> None:
        self.clips.add(clip)
        if seconds is not None:
            self.cuts.add(seconds)


def _present(memory: Memory, sources: list[_Source], sampling: Sampling) -> dict[str, set[int]]:
    """The clips each source (by key) already has in the memory; names each source as its items
    are named there, a new one by its file name unless another input holds that name. Refuses a
    video or clip folder cut differently before."""
    keyed: dict[str, _Held] = {}  # by SOURCE_KEY
    named: dict[str, str] = {}  # SOURCE_KEY -> the name its items carry
    unkeyed: dict[str, _Held] = {}  # items from before keys were recorded, by name
    for item in memory.items():
        if item.source is None or item.clip is None:
            continue
        key = item.meta.get(SOURCE_KEY)
        if isinstance(key, str):
            keyed.setdefault(key, _Held()).add(item.clip, item.meta.get("clip_seconds"))
            named.setdefault(key, item.source)
        else:
            unkeyed.setdefault(item.source, _Held()).add(item.clip, item.meta.get("clip_seconds"))
    claimed = set(named.values())  # names that belong to an input (with its unkeyed items, if any)
    taken = claimed | set(unkeyed)
    done: dict[str, set[int]] = {}
    for src in sources:
        if src.key in named:
            src.source = named[src.key]
        elif src.source in claimed:  # another input's name
            src.source = _free_name(src, taken)
        # else a new name, or unkeyed items of this name that no input claims: they are taken to be
        # this input's, as before keys were recorded (nothing else tells them apart).
        claimed.add(src.source)
        taken.add(src.source)
        held = [h for h in (keyed.get(src.key), unkeyed.get(src.source)) if h is not None]
        _check_cut(memory, src, held, sampling)
        done[src.key] = set().union(*(h.clips for h in held))
    return done


def _free_name(src: _Source, taken: set[str]) -> str:
    digits = src.key.removeprefix("sha256:")
    return next(
        name for n in range(8, len(digits) + 1, 4) if (name := f"{src.source}-{digits[:n]}") not in taken
    )


def _check_cut(memory: Memory, src: _Source, held: list[_Held], sampling: Sampling) -> None:
    before = next((s for h in held for s in h.cuts if s != sampling.clip_seconds), None)
    if src.kind != "captions" and before is not None:
        raise BadInput(
            f"memory {memory.name!r} holds {src.source!r} cut into {before:g} s clips; ingest it "
            f"with --clip-seconds {before:g}, or into another memory"
        )


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
        SOURCE_KEY: src.key,
    }
    if transcriber is not None:
        meta["transcriber"] = transcriber.id
        meta["transcript"] = transcript or ""
    return caption_item(
        clip.index, caption, source=src.source, start=round(clip.start, 3), end=round(clip.end, 3),
        transcript=transcript, meta=meta,
    )  # fmt: skip
