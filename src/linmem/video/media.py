"""Video files through ffmpeg: duration and streams, fixed-length clip spans, frames and audio.

Every call runs the real ``ffmpeg``/``ffprobe`` binaries (found on PATH, or named by
``$LINMEM_FFMPEG``, whose sibling ``ffprobe`` is used). Nothing is cut into files on disk: a
clip is a time span of the source, and frames and audio are decoded from that span directly
(input seeking, so clip 40 of a long video does not decode the first 20 minutes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BadInput, LinmemError

SAMPLE_RATE = 16_000
# A trailing remnant shorter than this is container rounding, not a clip: a 90.02 s video has 3
# clips, the last one 30.02 s long.
MIN_TAIL_SECONDS = 1.0


class MissingTool(LinmemError):
    code = "missing_tool"


@dataclass(frozen=True, slots=True)
class Probe:
    """What ffprobe reports about a file: its duration and whether it has picture and sound."""

    path: Path
    duration: float
    has_video: bool
    has_audio: bool


@dataclass(frozen=True, slots=True)
class Span:
    """Clip `index` of a video: seconds [start, end)."""

    index: int
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def tools() -> tuple[str, str]:
    """Paths of ffmpeg and ffprobe; MissingTool with an install hint when either is absent."""
    override = os.environ.get("LINMEM_FFMPEG")
    if override:
        ffmpeg = shutil.which(override)
        ffprobe = shutil.which(str(Path(override).with_name("ffprobe"))) if ffmpeg else None
    else:
        ffmpeg, ffprobe = shutil.which("ffmpeg"), shutil.which("ffprobe")
    if not ffmpeg or not ffprobe:
        where = f"$LINMEM_FFMPEG={override}" if override else "PATH"
        raise MissingTool(
            f"ffmpeg and ffprobe are needed to read videos, and {where} lacks "
            f"{'ffmpeg' if not ffmpeg else 'ffprobe'}: install ffmpeg (apt-get install ffmpeg, "
            "brew install ffmpeg) or point LINMEM_FFMPEG at the ffmpeg binary"
        )
    return ffmpeg, ffprobe


def probe(path: str | Path) -> Probe:
    """Duration and streams of a video; BadInput naming the file when it is not a playable video."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: no such video file")
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: the file is empty (0 bytes), not a video")
    _, ffprobe = tools()
    cmd = [ffprobe, "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()[-1:] or ["no message"]
        raise BadInput(f"{path}: not a video ffmpeg can read (ffprobe said: {said[0]})")
    info = json.loads(done.stdout or "{}")
    streams = info.get("streams") or []
    # Cover art and other still pictures are video streams too; a video has frames over time.
    videos = [s for s in streams if s.get("codec_type") == "video" and not _still(s)]
    has_audio = any(s.get("codec_type") == "audio" for s in streams)
    duration = _duration(info, videos)
    if not streams or (videos and duration <= 0):
        raise BadInput(f"{path}: the video is empty (duration {duration:g} s, {len(streams)} streams)")
    if not videos:
        kinds = sorted({str(s.get("codec_type")) for s in streams})
        raise BadInput(f"{path}: no video stream (streams found: {', '.join(kinds)})")
    return Probe(path=path, duration=duration, has_video=True, has_audio=has_audio)


def _still(stream: dict[str, Any]) -> bool:
    disposition = stream.get("disposition")
    return isinstance(disposition, dict) and bool(disposition.get("attached_pic"))


def _duration(info: dict[str, Any], videos: list[dict[str, Any]]) -> float:
    form = info.get("format")
    candidates = [form.get("duration")] if isinstance(form, dict) else []
    candidates += [s.get("duration") for s in videos]
    for value in candidates:
        try:
            seconds = float(str(value))
        except ValueError:
            continue
        if math.isfinite(seconds):
            return seconds
    return 0.0


def spans(duration: float, clip_seconds: float = 30.0) -> list[Span]:
    """Clip i covers [i·clip_seconds, (i+1)·clip_seconds), the last one ending at `duration` (a
    remnant under a second joins the clip before it)."""
    if clip_seconds <= 0:
        raise BadInput(f"clip length must be > 0 seconds, found {clip_seconds:g}")
    count = math.ceil(duration / clip_seconds)
    out = [Span(i, i * clip_seconds, min(duration, (i + 1) * clip_seconds)) for i in range(count)]
    if len(out) > 1 and out[-1].seconds < MIN_TAIL_SECONDS:  # absorbed by the clip before it
        out.pop()
        out[-1] = Span(out[-1].index, out[-1].start, duration)
    return out


def frames(
    path: str | Path, span: Span, *, fps: float = 1.0, max_frames: int = 8, max_side: int = 448
) -> list[bytes]:
    """JPEG frames of one clip, sampled at `fps` (at most `max_frames`, evenly spread), scaled so
    the longer side is at most `max_side` pixels."""
    if fps <= 0 or max_frames < 1:
        raise BadInput(f"frame sampling needs fps > 0 and max_frames >= 1, found {fps:g} and {max_frames}")
    ffmpeg, _ = tools()
    rate = min(fps, max_frames / max(span.seconds, 1e-3))
    scale = f"scale='if(gte(iw,ih),min({max_side},iw),-2)':'if(gte(iw,ih),-2,min({max_side},ih))'"
    with tempfile.TemporaryDirectory(prefix="linmem-frames-") as tmp:
        pattern = str(Path(tmp) / "%05d.jpg")
        _run(
            [ffmpeg, "-nostdin", "-v", "error", "-ss", f"{span.start:.3f}", "-t", f"{span.seconds:.3f}",
             "-i", str(path), "-an", "-vf", f"fps={rate:.6f},{scale}", "-q:v", "3", pattern],
            path,
        )  # fmt: skip
        files = sorted(Path(tmp).glob("*.jpg"))
        if len(files) > max_frames:
            step = len(files) / max_frames
            files = [files[int(i * step)] for i in range(max_frames)]
        return [f.read_bytes() for f in files]


def audio(path: str | Path, span: Span) -> bytes:
    """The clip's sound as a 16 kHz mono 16-bit WAV file (bytes)."""
    ffmpeg, _ = tools()
    with tempfile.TemporaryDirectory(prefix="linmem-audio-") as tmp:
        out = Path(tmp) / "clip.wav"
        _run(
            [ffmpeg, "-nostdin", "-v", "error", "-ss", f"{span.start:.3f}", "-t", f"{span.seconds:.3f}",
             "-i", str(path), "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le", str(out)],
            path,
        )  # fmt: skip
        return out.read_bytes()


def _run(cmd: list[str], path: str | Path) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()[-1:] or ["no message"]
        raise BadInput(f"{path}: ffmpeg failed ({said[0]})")
