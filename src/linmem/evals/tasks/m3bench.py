"""M3-Bench (robot and web) questions over a video's memory: clip captions or M3-Agent memory graphs.

Annotations are the published JSON: video id -> ``{"qa_list": [...], ...}``; robot QA carry the
ask time (``timestamp`` "MM:SS") and ``before_clip``, the last clip finished before the question,
which becomes the example's `upto`; web entries add ``video_url`` and have neither.

Memory of a video, from ``memory_dir``:

- ``memory="captions"``: ``<video_id>.jsonl``, one line per caption,
  ``{"clip": 3, "start": 90, "end": 120, "caption": "...", "transcript": "..."}``
  (``start``/``end`` in seconds and ``transcript`` optional); one item per line, in clip order.
- ``memory="graph"``: ``<video_id>.pkl``, M3-Agent's memory graph read by `linmem.evals.m3graph`;
  one item per episodic or semantic line, translated to character ids, 30-second clips.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import BadInput
from ...types import Item
from ..m3graph import graph_clip_lines, load_graph
from . import read_json
from .base import Example, Task

SPLITS = ("robot", "web")
MEMORIES = ("captions", "graph")
CLIP_SECONDS = 30

# M3-Bench renamed two question types between files and releases; one name each here.
TYPE_ALIASES = {
    "multi-detail reasoning": "Multi-Evidence Reasoning",
    "multi-evidence reasoning": "Multi-Evidence Reasoning",
    "human understanding": "Person Understanding",
    "person understanding": "Person Understanding",
    "cross-modal reasoning": "Cross-Modal Reasoning",
    "general knowledge extraction": "General Knowledge Extraction",
    "multi-hop reasoning": "Multi-Hop Reasoning",
}
_QA_FIELDS = ("question", "answer", "question_id", "type")
_ROBOT_FIELDS = ("timestamp", "before_clip")


def normalize_type(label: str) -> str:
    """The canonical name of an M3-Bench question type (unknown labels come back trimmed)."""
    clean = " ".join(str(label).split())
    return TYPE_ALIASES.get(clean.lower(), clean)


def mmss(seconds: float) -> str:
    """``"MM:SS"`` for a time in seconds (minutes may exceed 59)."""
    whole = max(0, int(seconds))
    return f"{whole // 60:02d}:{whole % 60:02d}"


class M3BenchTask(Task):
    """M3-Bench QA: kind "qa", id = question_id, source = video id, `upto` = before_clip (robot)."""

    name = "m3bench"

    def __init__(
        self,
        annotations: str,
        split: str | None = None,
        memory: str = "captions",
        memory_dir: str | None = None,
    ) -> None:
        super().__init__()
        if split is not None and split not in SPLITS:
            raise BadInput(f"unknown M3-Bench split {split!r}: expected one of {', '.join(SPLITS)}")
        if memory not in MEMORIES:
            raise BadInput(f"unknown M3-Bench memory {memory!r}: expected one of {', '.join(MEMORIES)}")
        if memory_dir is not None and (
            not isinstance(memory_dir, str | Path) or not Path(memory_dir).is_dir()
        ):
            raise BadInput(f"M3-Bench memory_dir {memory_dir} is not a directory")
        data = read_json(annotations)
        self.path = Path(annotations)
        self.memory_kind = memory
        self.memory_dir = Path(memory_dir) if memory_dir is not None else None
        if not isinstance(data, dict):
            raise BadInput(f"{self.path}: expected an object of video id -> entry, not {type(data).__name__}")
        self.split = split or _infer_split(data)
        self.videos: tuple[str, ...] = tuple(data)
        self._cache: dict[str, list[Item]] = {}
        seen: set[str] = set()
        for video, entry in data.items():
            for example in self._video_examples(video, entry):
                if example.id in seen:
                    raise BadInput(f"{self.path}: video {video!r}: duplicate question_id {example.id!r}")
                seen.add(example.id)
                self._examples.append(example)

    def _video_examples(self, video: str, entry: Any) -> list[Example]:
        where = f"{self.path}: video {video!r}"
        if not isinstance(entry, dict):
            raise BadInput(f"{where}: expected an object, found {type(entry).__name__}")
        if "qa_list" not in entry:
            raise BadInput(f"{where}: missing field 'qa_list'")
        if not isinstance(entry["qa_list"], list):
            raise BadInput(f"{where}: field 'qa_list' must be a list")
        examples = [self._example(video, index, qa) for index, qa in enumerate(entry["qa_list"])]
        # Growing `upto` within a video lets a runner extend one memory snapshot instead of rebuilding.
        return sorted(examples, key=lambda e: -1 if e.upto is None else e.upto)

    def _example(self, video: str, index: int, qa: Any) -> Example:
        if not isinstance(qa, dict):
            raise BadInput(f"{self.path}: video {video!r} question #{index}: expected an object")
        qid = qa.get("question_id")
        where = f"{self.path}: video {video!r} question {qid if qid is not None else f'#{index}'!r}"
        required = _QA_FIELDS + (_ROBOT_FIELDS if self.split == "robot" else ())
        for name in required:
            if name not in qa:
                raise BadInput(f"{where}: missing field {name!r}")
        labels = qa["type"] if isinstance(qa["type"], list) else [qa["type"]]
        upto = None
        if self.split == "robot":
            upto = qa["before_clip"]
            if isinstance(upto, bool) or not isinstance(upto, int):
                raise BadInput(f"{where}: field 'before_clip' must be an integer, found {upto!r}")
        meta = {"video": video, "split": self.split, "type_labels": [str(t) for t in labels]}
        for name in ("timestamp", "reasoning"):
            if name in qa:
                meta[name] = qa[name]
        return Example(
            id=str(qid),
            kind="qa",
            question=str(qa["question"]),
            source=video,
            answer=str(qa["answer"]),
            upto=upto,
            types=tuple(dict.fromkeys(normalize_type(t) for t in labels)),
            meta=meta,
        )

    def items(self, source: str) -> list[Item]:
        if source not in self._cache:
            if source not in self.videos:
                raise BadInput(f"unknown M3-Bench video {source!r}: not in {self.path}")
            if self.memory_dir is None:
                raise BadInput(f"M3-Bench memory of video {source!r} needs memory_dir (a folder of memories)")
            suffix = ".jsonl" if self.memory_kind == "captions" else ".pkl"
            path = self.memory_dir / f"{source}{suffix}"
            if not path.is_file():
                raise BadInput(f"no {self.memory_kind} memory for video {source!r}: expected {path}")
            read = read_captions if self.memory_kind == "captions" else read_graph_items
            self._cache[source] = read(path, source)
        return list(self._cache[source])


def read_captions(path: str | Path, source: str) -> list[Item]:
    """Caption items of one video from a JSON Lines caption file, in clip order."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        number = raw[: e.start].count(b"\n") + 1
        raise BadInput(f"{path}:{number}: not UTF-8") from None
    items = []
    for number, line in enumerate(content.splitlines(), start=1):
        if line.strip():
            try:
                items.append(_caption_item(line, source))
            except BadInput as e:
                raise BadInput(f"{path}:{number}: {e}") from None
    if not items:
        raise BadInput(f"{path}: no captions (the file is empty)")
    return sorted(items, key=lambda i: i.clip or 0)


def _caption_item(line: str, source: str) -> Item:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadInput(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BadInput(f"expected a JSON object, found {type(obj).__name__}")
    for name in ("clip", "caption"):
        if name not in obj:
            raise BadInput(f"missing field {name!r}")
    clip, caption = obj["clip"], obj["caption"]
    if isinstance(clip, bool) or not isinstance(clip, int) or clip < 0:
        raise BadInput(f"field 'clip' must be an integer >= 0, found {clip!r}")
    if not isinstance(caption, str) or not caption.strip():
        raise BadInput("field 'caption' must be a non-empty string")
    times = [obj.get(name) for name in ("start", "end")]
    for name, value in zip(("start", "end"), times, strict=True):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise BadInput(f"field {name!r} must be a number of seconds, found {value!r}")
    transcript = obj.get("transcript")
    if transcript is not None and not isinstance(transcript, str):
        raise BadInput("field 'transcript' must be a string")
    text = caption.strip() + (f' Speech: "{transcript.strip()}"' if transcript and transcript.strip() else "")
    start, end = times
    time = f"{mmss(start)}-{mmss(end)}" if start is not None and end is not None else None
    return Item(text=text, clip=clip, time=time, source=source, meta={"start": start, "end": end})


def read_graph_items(path: str | Path, source: str) -> list[Item]:
    """The translated episodic and semantic lines of an M3-Agent memory graph, one item each."""
    try:
        lines = graph_clip_lines(load_graph(path))
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise BadInput(f"{path}: malformed memory graph ({type(e).__name__}: {e})") from None
    if not lines:
        raise BadInput(f"{path}: the memory graph has no episodic or semantic lines")
    return [
        Item(
            text=text,
            clip=clip,
            time=f"{mmss(clip * CLIP_SECONDS)}-{mmss((clip + 1) * CLIP_SECONDS)}",
            source=source,
            meta={"kind": kind},
        )
        for clip, clip_lines in lines.items()
        for kind, text in clip_lines
    ]


def _infer_split(data: dict[str, Any]) -> str:
    web = any(isinstance(entry, dict) and "video_url" in entry for entry in data.values())
    return "web" if web else "robot"
