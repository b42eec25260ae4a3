"""Video to memory with the real ffmpeg, a tiny random Qwen3.5 VLM and a local OpenAI-compatible server.

The test video's brightness grows with time (luma = 2·t), so the brightness of a sampled frame
says when it was taken: frames can be checked to come from their clip's span.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path

import pytest
from openai_server import OpenAIServer, text_of
from PIL import Image, ImageStat

from linmem import cli
from linmem.errors import BadInput, EngineError
from linmem.memory import open_memory
from linmem.video import Sampling, ingest, load_captioner, media
from linmem.video.captions import caption_item
from linmem.video.media import MissingTool

# Only the tests that use the videos need ffmpeg: captions files go in without it.
NO_FFMPEG = shutil.which("ffmpeg") is None and not os.environ.get("LINMEM_REQUIRE_FFMPEG")

DURATION = 95


def _make(path: Path, *inputs: str, extra: tuple[str, ...] = ()) -> Path:
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-y"]
    for spec in inputs:
        cmd += ["-f", "lavfi", "-i", spec]
    subprocess.run([*cmd, *extra, str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if NO_FFMPEG:
        pytest.skip("ffmpeg is not installed (CI installs it and sets LINMEM_REQUIRE_FFMPEG)")
    root = tmp_path_factory.mktemp("videos")
    ramp = f"nullsrc=s=64x48:r=5:d={DURATION},geq=lum='2*T':cb=128:cr=128"
    tone = f"sine=frequency=440:sample_rate=44100:duration={DURATION}"
    h264 = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p")
    out = {
        "ramp": _make(root / "ramp.mp4", ramp, tone, extra=(*h264, "-c:a", "aac", "-shortest")),
        "silent": _make(root / "silent.mp4", "testsrc=s=96x64:r=5:d=40", extra=h264),
        "zero": _make(root / "zero.mp4", "testsrc=s=64x48:r=5", extra=("-frames:v", "0")),
    }
    clips = root / "ramp-clips"
    clips.mkdir()
    for i in range(4):  # pre-cut, the way M3-Agent's README does it (but re-encoded, so exact)
        subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-y", "-ss", str(30 * i), "-t", "30",
             "-i", str(out["ramp"]),
             *h264, "-c:a", "aac", str(clips / f"{i}.mp4")],
            check=True,
        )  # fmt: skip
    out["clips"] = clips
    (root / "notes.mp4").write_text("these are meeting notes, not a video\n")
    out["notes"] = root / "notes.mp4"
    return out


def _seconds(jpeg: bytes) -> float:
    """When a frame of the ramp video was taken, from its brightness (limited-range luma)."""
    gray = ImageStat.Stat(Image.open(io.BytesIO(jpeg)).convert("L")).mean[0]
    return (gray * 219 / 255 + 16) / 2


# Cutting, frames, audio


def test_a_95_second_video_is_four_clips_with_exact_boundaries(videos: dict[str, Path]) -> None:
    info = media.probe(videos["ramp"])
    assert info.has_video and info.has_audio and info.duration == pytest.approx(DURATION, abs=0.1)
    spans = media.spans(info.duration, 30)
    assert [(s.index, s.start, s.end) for s in spans] == [
        (0, 0, 30),
        (1, 30, 60),
        (2, 60, 90),
        (3, 90, pytest.approx(DURATION, abs=0.1)),
    ]


@pytest.mark.parametrize(
    ("duration", "clip", "expected"),
    [(90.0, 30, 3), (90.02, 30, 3), (91.5, 30, 4), (0.4, 30, 1), (7.0, 2.5, 3), (59.999, 60, 1)],
)
def test_clip_count_drops_only_a_sub_second_tail(duration: float, clip: float, expected: int) -> None:
    spans = media.spans(duration, clip)
    assert len(spans) == expected
    assert spans[-1].end == pytest.approx(duration)
    assert all(a.end == b.start for a, b in zip(spans, spans[1:], strict=False))


@pytest.mark.parametrize(
    ("fps", "max_frames", "clip", "count"), [(1, 8, 0, 8), (0.2, 8, 1, 6), (1, 8, 3, 5), (0.5, 3, 2, 3)]
)
def test_frames_are_sampled_as_configured_from_their_clip(
    videos: dict[str, Path], fps: float, max_frames: int, clip: int, count: int
) -> None:
    span = media.spans(media.probe(videos["ramp"]).duration)[clip]
    frames = media.frames(videos["ramp"], span, fps=fps, max_frames=max_frames)
    assert len(frames) == count
    times = [_seconds(f) for f in frames]
    assert times == sorted(times)
    # Luma below 16 clips to black, so the first seconds all read as t = 8.
    assert all(max(span.start, 8) - 1.5 <= t <= span.end + 1.5 for t in times), (span, times)


def test_frames_are_scaled_to_the_longer_side(videos: dict[str, Path]) -> None:
    span = media.Span(0, 0.0, 10.0)
    (frame,) = media.frames(videos["silent"], span, fps=0.1, max_frames=1, max_side=48)
    assert Image.open(io.BytesIO(frame)).size == (48, 32)  # 96x64, aspect kept
    (frame,) = media.frames(videos["silent"], span, fps=0.1, max_frames=1, max_side=448)
    assert Image.open(io.BytesIO(frame)).size == (96, 64)  # never upscaled


def test_audio_is_16khz_mono_of_the_clip_length(videos: dict[str, Path]) -> None:
    spans = media.spans(media.probe(videos["ramp"]).duration)
    for span in (spans[1], spans[3]):
        with wave.open(io.BytesIO(media.audio(videos["ramp"], span))) as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            assert w.getnframes() / 16000 == pytest.approx(span.seconds, abs=0.05)


# Captioning


def test_tiny_qwen35_vlm_captions_every_clip(videos: dict[str, Path], linmem_home: Path) -> None:
    memory = open_memory("vid", home=linmem_home, create=True)
    sampling = Sampling(fps=0.5, max_frames=3)
    reports = ingest(
        memory, [videos["ramp"]], captioner="tiny:qwen3.5-vl", sampling=sampling, max_new_tokens=6
    )
    assert [r.to_dict() for r in reports] == [
        {
            "source": "ramp",
            "path": str(videos["ramp"]),
            "kind": "video",
            "clips": 4,
            "written": 4,
            "skipped": 0,
        }
    ]
    items = memory.items()
    assert [(i.clip, i.time, i.source) for i in items] == [
        (0, "00:00-00:30", "ramp"),
        (1, "00:30-01:00", "ramp"),
        (2, "01:00-01:30", "ramp"),
        (3, "01:30-01:35", "ramp"),
    ]
    assert [i.meta["frames"] for i in items] == [3, 3, 3, 3]
    assert all(i.meta["captioner"] == "tiny:qwen3.5-vl" and i.text.strip() for i in items)
    assert items[3].meta["end"] == pytest.approx(DURATION, abs=0.1)


def test_a_vlm_saved_to_disk_loads_and_captions_identically(videos: dict[str, Path], tmp_path: Path) -> None:
    from linmem.engines import tiny

    directory = tiny.save("qwen3.5-vl", tmp_path / "vlm")
    span = media.Span(1, 30.0, 60.0)
    frames = media.frames(videos["ramp"], span, fps=0.2, max_frames=2)
    built, loaded = load_captioner("tiny:qwen3.5-vl"), load_captioner(f"hf:{directory}")
    assert loaded.id == f"hf:{directory}"
    assert built.caption(frames, "What happens?", max_new_tokens=8) == loaded.caption(
        frames, "What happens?", max_new_tokens=8
    )


def _captioning_server(calls: list[dict[str, object]]) -> OpenAIServer:
    def chat(request: dict[str, object]) -> dict[str, str]:
        (message,) = request["messages"]  # type: ignore[misc]
        parts = message["content"]
        images = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        for url in images:
            head, data = url.split(",", 1)
            assert head == "data:image/jpeg;base64"
            Image.open(io.BytesIO(base64.b64decode(data))).verify()
        prompt = text_of(parts)
        calls.append({"images": len(images), "prompt": prompt})
        clip = prompt.split("come from clip ")[1].split(" ")[0]
        return {"content": f"Clip {clip}: the screen brightens ({len(images)} frames)."}

    return OpenAIServer(chat=chat, model="vlm")


def test_an_openai_endpoint_captions_and_a_transcription_endpoint_hears(
    videos: dict[str, Path], linmem_home: Path
) -> None:
    calls: list[dict[str, object]] = []
    heard: list[tuple[int, int, str]] = []

    def transcribe(audio: bytes, fields: dict[str, str]) -> str:
        with wave.open(io.BytesIO(audio)) as w:
            heard.append((w.getframerate(), w.getnchannels(), fields["model"]))
            return f"a {w.getnframes() // 16000} second tone"

    server = _captioning_server(calls)
    server.transcribe = transcribe
    with server:
        memory = open_memory("web", home=linmem_home, create=True)
        ingest(
            memory,
            [videos["ramp"]],
            captioner=f"openai:{server.url}#vlm",
            transcriber=f"openai:{server.url}#whisper-1",
            sampling=Sampling(fps=0.1, max_frames=2),
        )
    assert heard == [(16000, 1, "whisper-1")] * 4
    assert [c["images"] for c in calls] == [2, 2, 2, 1]  # 5 s at 0.1 fps is one frame
    assert 'Speech heard in the clip: "a 30 second tone"' in str(calls[0]["prompt"])
    items = memory.items()
    assert items[0].text == 'Clip 0: the screen brightens (2 frames). Speech: "a 30 second tone"'
    assert items[3].text == 'Clip 3: the screen brightens (1 frames). Speech: "a 5 second tone"'
    assert items[1].meta["transcript"] == "a 30 second tone"


def test_a_video_without_sound_is_not_sent_for_transcription(
    videos: dict[str, Path], linmem_home: Path
) -> None:
    heard: list[bytes] = []
    calls: list[dict[str, object]] = []
    server = _captioning_server(calls)
    server.transcribe = lambda audio, fields: heard.append(audio) or "?"
    with server:
        memory = open_memory("quiet", home=linmem_home, create=True)
        ingest(memory, [videos["silent"]], captioner=f"openai:{server.url}#vlm",
               transcriber=f"openai:{server.url}#w", sampling=Sampling(fps=0.1, max_frames=1))  # fmt: skip
    assert heard == [] and len(memory.items()) == 2
    assert all(i.meta["transcript"] == "" and "Speech" not in i.text for i in memory.items())


# Resuming


def test_a_failed_clip_stops_the_run_and_the_rerun_resumes_without_duplicates(
    videos: dict[str, Path], linmem_home: Path
) -> None:
    calls: list[dict[str, object]] = []
    server = _captioning_server(calls)
    memory = open_memory("resume", home=linmem_home, create=True)
    with server:
        spec = f"openai:{server.url}#vlm"
        sampling = Sampling(fps=0.1, max_frames=1)
        original = server.chat
        server.chat = lambda r: original(r) if len(calls) < 2 else {"content": "   "}
        with pytest.raises(EngineError, match="clip 2 .*empty caption"):
            ingest(memory, [videos["ramp"]], captioner=spec, sampling=sampling)
        assert [i.clip for i in memory.items()] == [0, 1]
        server.chat = original
        calls.clear()
        (report,) = ingest(memory, [videos["ramp"]], captioner=spec, sampling=sampling)
        assert (report.written, report.skipped) == (2, 2)
        assert len(calls) == 2
        (again,) = ingest(memory, [videos["ramp"]], captioner=spec, sampling=sampling)
    assert (again.written, again.skipped) == (0, 4)
    assert [i.clip for i in memory.items()] == [0, 1, 2, 3]


def test_an_ingest_killed_mid_run_resumes_without_duplicates(
    videos: dict[str, Path], linmem_home: Path
) -> None:
    calls: list[dict[str, object]] = []
    server = _captioning_server(calls)
    original = server.chat
    hold = threading.Event()

    def slow_third(request: dict[str, object]) -> dict[str, str]:
        if len(calls) == 2:
            hold.wait(30)  # the process is killed while it waits for clip 2's caption
        return original(request)

    server.chat = slow_third
    with server:
        cmd = [sys.executable, "-m", "linmem", "ingest", str(videos["ramp"]), "--memory", "killed",
               "--home", str(linmem_home), "--captioner", f"openai:{server.url}#vlm", "--fps", "0.1",
               "--max-frames", "1"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while len(calls) < 2 or len(server.requests) < 3:
                assert time.monotonic() < deadline and proc.poll() is None, "ingest never reached clip 2"
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            hold.set()
            if proc.poll() is None:
                proc.kill()
        memory = open_memory("killed", home=linmem_home)
        assert [i.clip for i in memory.items()] == [0, 1]
        server.chat = original
        (report,) = ingest(memory, [videos["ramp"]], captioner=f"openai:{server.url}#vlm",
                           sampling=Sampling(fps=0.1, max_frames=1))  # fmt: skip
    assert (report.written, report.skipped) == (2, 2)
    assert [i.clip for i in memory.items()] == [0, 1, 2, 3]


def test_recutting_a_source_at_another_length_is_refused(videos: dict[str, Path], linmem_home: Path) -> None:
    calls: list[dict[str, object]] = []
    with _captioning_server(calls) as server:
        memory = open_memory("cut", home=linmem_home, create=True)
        spec = f"openai:{server.url}#vlm"
        ingest(memory, [videos["silent"]], captioner=spec, sampling=Sampling(fps=0.1, max_frames=1))
        with pytest.raises(BadInput, match="cut into 30 s clips; ingest it with --clip-seconds 30"):
            ingest(memory, [videos["silent"]], captioner=spec, sampling=Sampling(clip_seconds=10))
    assert len(memory.items()) == 2


def test_two_videos_of_one_name_are_two_sources_and_each_resumes(
    videos: dict[str, Path], linmem_home: Path, tmp_path: Path
) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    first = shutil.copy(videos["silent"], tmp_path / "a" / "cam.mp4")
    second = shutil.copy(videos["ramp"], tmp_path / "b" / "cam.mp4")
    calls: list[dict[str, object]] = []
    with _captioning_server(calls) as server:
        memory = open_memory("cams", home=linmem_home, create=True)
        spec, sampling = f"openai:{server.url}#vlm", Sampling(fps=0.1, max_frames=1)
        (a,) = ingest(memory, [first], captioner=spec, sampling=sampling)
        (b,) = ingest(memory, [second], captioner=spec, sampling=sampling)
        again = ingest(memory, [first, second], captioner=spec, sampling=sampling)
    assert [(r.source, r.written) for r in (a, b)] == [("cam", 2), (f"cam-{_key(second)[7:15]}", 4)]
    assert [(r.written, r.skipped) for r in again] == [(0, 2), (0, 4)] and len(calls) == 6
    assert [i.meta["source_key"] for i in memory.items()] == [_key(first)] * 2 + [_key(second)] * 4


# Other inputs


def test_a_directory_of_precut_clips_is_placed_on_the_timeline(
    videos: dict[str, Path], linmem_home: Path
) -> None:
    calls: list[dict[str, object]] = []
    with _captioning_server(calls) as server:
        memory = open_memory("precut", home=linmem_home, create=True)
        (report,) = ingest(memory, [videos["clips"]], captioner=f"openai:{server.url}#vlm",
                           sampling=Sampling(fps=0.1, max_frames=3))  # fmt: skip
    assert (report.source, report.kind, report.clips) == ("ramp-clips", "clips", 4)
    assert [(i.clip, i.time) for i in memory.items()] == [
        (0, "00:00-00:30"), (1, "00:30-01:00"), (2, "01:00-01:30"), (3, "01:30-01:35"),
    ]  # fmt: skip
    assert [c["images"] for c in calls] == [3, 3, 3, 1]


def test_a_captions_file_needs_no_model_and_goes_in_once(tmp_path: Path, linmem_home: Path) -> None:
    captions = tmp_path / "kitchen.jsonl"
    lines = [
        {"clip": 0, "start": 0, "end": 30, "caption": "A woman opens the fridge."},
        {"clip": 1, "start": 30, "end": 60, "caption": "She pours milk.", "transcript": "Want some?"},
    ]
    captions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    memory = open_memory("cap", home=linmem_home, create=True)
    (first,) = ingest(memory, [captions], captioner="hf:/nonexistent/never-loaded")
    (second,) = ingest(memory, [captions], captioner="hf:/nonexistent/never-loaded")
    assert (first.written, second.written, second.skipped) == (2, 0, 2)
    assert [(i.clip, i.time, i.text) for i in memory.items()] == [
        (0, "00:00-00:30", "A woman opens the fridge."),
        (1, "00:30-01:00", 'She pours milk. Speech: "Want some?"'),
    ]


def _captions(path: Path, captions: list[str]) -> Path:
    """A captions file of 30 s clips 0, 1, ... with these captions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"clip": i, "start": 30 * i, "end": 30 * i + 30, "caption": c} for i, c in enumerate(captions)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _key(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_captions_files_of_one_name_are_two_sources(tmp_path: Path, linmem_home: Path) -> None:
    day1 = _captions(tmp_path / "day1" / "cam.jsonl", ["Monday: the door opens.", "Monday: rain."])
    day2 = _captions(tmp_path / "day2" / "cam.jsonl", ["Tuesday: a cat.", "Tuesday: sun.", "Tuesday: dusk."])
    memory = open_memory("days", home=linmem_home, create=True)
    (first,) = ingest(memory, [day1])
    (second,) = ingest(memory, [day2])
    assert (first.source, first.written) == ("cam", 2)
    # Another file under a name the memory already holds: named apart, so sources do not merge.
    assert (second.source, second.written) == (f"cam-{_key(day2)[7:15]}", 3)
    again = ingest(memory, [day2, day1])  # the same files again, in one run: both resume
    assert [(r.source, r.written, r.skipped) for r in again] == [(second.source, 0, 3), ("cam", 0, 2)]
    items = memory.items()
    assert [(i.source, i.clip, i.text) for i in items] == [
        ("cam", 0, "Monday: the door opens."),
        ("cam", 1, "Monday: rain."),
        (second.source, 0, "Tuesday: a cat."),
        (second.source, 1, "Tuesday: sun."),
        (second.source, 2, "Tuesday: dusk."),
    ]
    assert [i.meta["source_key"] for i in items] == [_key(day1)] * 2 + [_key(day2)] * 3


def test_one_run_of_two_files_of_one_name_ingests_both(tmp_path: Path, linmem_home: Path) -> None:
    a = _captions(tmp_path / "a" / "cam.jsonl", ["A."])
    b = _captions(tmp_path / "b" / "cam.jsonl", ["B."])
    memory = open_memory("both", home=linmem_home, create=True)
    reports = ingest(memory, [a, b])
    assert [(r.source, r.written) for r in reports] == [("cam", 1), (f"cam-{_key(b)[7:15]}", 1)]
    copy = shutil.copy(a, tmp_path / "copy.jsonl")
    with pytest.raises(BadInput, match=r"copy\.jsonl and .*a/cam\.jsonl have the same content"):
        ingest(memory, [a, copy])
    assert len(memory.items()) == 2


def test_items_ingested_before_source_keys_still_count_as_done(tmp_path: Path, linmem_home: Path) -> None:
    memory = open_memory("old", home=linmem_home, create=True)
    kitchen = _captions(tmp_path / "kitchen.jsonl", ["Fridge opens.", "Milk poured.", "Door shuts."])
    # What an earlier linmem wrote: the file's name, no key.
    memory.write(
        [
            caption_item(
                i, text, source="kitchen", start=30 * i, end=30 * i + 30, meta={"ingest": "captions"}
            )
            for i, text in enumerate(["Fridge opens.", "Milk poured."])
        ]
    )
    (report,) = ingest(memory, [kitchen])
    assert (report.source, report.written, report.skipped) == ("kitchen", 1, 2)
    (report,) = ingest(memory, [kitchen])
    assert (report.written, report.skipped) == (0, 3)
    # The name now belongs to that file: another kitchen.jsonl is another source.
    other = _captions(tmp_path / "other" / "kitchen.jsonl", ["A different kitchen."])
    (report,) = ingest(memory, [other])
    assert (report.source, report.written) == (f"kitchen-{_key(other)[7:15]}", 1)
    assert [(i.source, i.clip) for i in memory.items()] == [
        ("kitchen", 0), ("kitchen", 1), ("kitchen", 2), (report.source, 0),
    ]  # fmt: skip


def _wait_until(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_concurrent_cli_ingests_of_one_file_write_each_clip_once(tmp_path: Path, linmem_home: Path) -> None:
    fcntl = pytest.importorskip("fcntl")  # the ingest lock is a POSIX flock
    clips = 3000
    captions = _captions(tmp_path / "cam.jsonl", [f"Clip {i}: someone walks by." for i in range(clips)])
    memory = open_memory("shared", home=linmem_home, create=True)
    cmd = [sys.executable, "-m", "linmem", "ingest", str(captions), "--memory", "shared",
           "--home", str(linmem_home), "--json"]  # fmt: skip
    errs = [tmp_path / f"err{n}.txt" for n in range(3)]
    with contextlib.ExitStack() as stack:
        # While this test holds the memory's ingest lock the three wait; letting go starts them at once.
        lock = stack.enter_context((memory.path / "ingest.lock").open("w"))
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stack.enter_context(err.open("w")))
            for err in errs
        ]
        try:
            _wait_until(
                lambda: (
                    all("waiting" in e.read_text() for e in errs) or any(p.poll() is not None for p in procs)
                )
            )
            written_while_held = len(memory.items())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert sorted(i.clip for i in memory.items()) == list(range(clips))  # each clip once
    assert written_while_held == 0
    assert sorted(o["sources"][0]["written"] for o in outs) == [0, 0, clips]
    for err in errs:
        assert "another ingest into memory 'shared' is running; waiting" in err.read_text()


# Bad input: clear errors, nothing written


@pytest.mark.parametrize(
    ("name", "message"),
    [("notes", "notes.mp4: not a video ffmpeg can read"), ("zero", "zero.mp4: the video is empty")],
)
def test_bad_videos_stop_before_anything_is_written(
    videos: dict[str, Path], linmem_home: Path, name: str, message: str
) -> None:
    memory = open_memory("bad", home=linmem_home, create=True)
    with pytest.raises(BadInput, match=message):  # the good video comes first and is not written either
        ingest(memory, [videos["silent"], videos[name]], captioner="tiny:qwen3.5-vl")
    assert memory.items() == []


def test_a_missing_ffmpeg_is_named_with_the_fix(
    videos: dict[str, Path],
    linmem_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LINMEM_FFMPEG", "/nonexistent/ffmpeg")
    memory = open_memory("noff", home=linmem_home, create=True)
    with pytest.raises(MissingTool, match="install ffmpeg"):
        ingest(memory, [videos["silent"]], captioner="tiny:qwen3.5-vl")
    code = cli.main(
        ["ingest", str(videos["silent"]), "--memory", "noff", "--home", str(linmem_home), "--json"]
    )
    error = json.loads(capsys.readouterr().out)["error"]
    assert code == 1 and error["code"] == "missing_tool" and "LINMEM_FFMPEG" in error["message"]
    assert memory.items() == []


def test_ffmpeg_missing_from_path_is_named(
    videos: dict[str, Path], linmem_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("LINMEM_FFMPEG", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no ffmpeg, no ffprobe
    memory = open_memory("nopath", home=linmem_home, create=True)
    with pytest.raises(MissingTool, match="PATH lacks ffmpeg: install ffmpeg"):
        ingest(memory, [videos["silent"]], captioner="tiny:qwen3.5-vl")
    assert memory.items() == []


def test_a_folder_of_whole_videos_is_told_how_to_ingest_them(
    videos: dict[str, Path], linmem_home: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "holiday"
    folder.mkdir()
    shutil.copy(videos["silent"], folder / "beach.mp4")
    memory = open_memory("folder", home=linmem_home, create=True)
    with pytest.raises(
        BadInput, match=r"named by their index .*'beach.mp4'.*linmem ingest .*holiday/\*\.mp4"
    ):
        ingest(memory, [folder], captioner="tiny:qwen3.5-vl")
    assert memory.items() == []


def test_a_failed_cli_ingest_leaves_no_new_memory_behind(
    videos: dict[str, Path], linmem_home: Path, capsys
) -> None:
    from linmem.memory import memories

    code = cli.main(
        ["ingest", str(videos["notes"]), "--memory", "fresh", "--home", str(linmem_home), "--json"]
    )
    assert code == 1 and "not a video" in json.loads(capsys.readouterr().out)["error"]["message"]
    assert "fresh" not in memories(linmem_home)


def test_cli_ingest_reports_one_json_object(videos: dict[str, Path], linmem_home: Path, capsys) -> None:
    args = ["ingest", str(videos["silent"]), "--memory", "cli", "--home", str(linmem_home),
            "--captioner", "tiny:qwen3.5-vl", "--fps", "0.1", "--max-frames", "1", "--max-new-tokens", "4",
            "--json"]  # fmt: skip
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory"] == "cli" and out["items"] == 2
    assert out["sources"] == [
        {
            "source": "silent",
            "path": str(videos["silent"]),
            "kind": "video",
            "clips": 2,
            "written": 2,
            "skipped": 0,
        }
    ]


def test_a_captioner_that_cannot_load_says_how_to_get_one(tmp_path: Path) -> None:
    from linmem.engines import tiny
    from linmem.errors import ModelUnavailable

    with pytest.raises(ModelUnavailable, match="no config.json"):
        load_captioner(f"hf:{tmp_path}")
    text_only = tiny.save("qwen3.5", tmp_path / "text-only")  # a language model without a vision tower
    with pytest.raises(ModelUnavailable, match=r"hf download .*--captioner openai:URL#MODEL"):
        load_captioner(f"hf:{text_only}")
