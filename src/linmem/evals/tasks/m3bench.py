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
- ``memory="structured"``: ``<video_id>.json``, a structured memory graph that linmem extracted
  from the captions (`linmem.structured`); items as for ``"graph"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import BadInput
from ...types import Item
from ...video.captions import line_items, read_captions
from ..m3graph import graph_clip_lines, load_graph
from . import read_json
from .base import Example, Task

SPLITS = ("robot", "web")
MEMORIES = ("captions", "graph", "structured")
SUFFIXES = {"captions": ".jsonl", "graph": ".pkl", "structured": ".json"}
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
            path = self.memory_dir / f"{source}{SUFFIXES[self.memory_kind]}"
            if not path.is_file():
                raise BadInput(f"no {self.memory_kind} memory for video {source!r}: expected {path}")
            read = {"captions": read_captions, "graph": read_graph_items, "structured": read_structured_items}
            self._cache[source] = read[self.memory_kind](path, source)
        return list(self._cache[source])


def read_graph_items(path: str | Path, source: str) -> list[Item]:
    """The translated episodic and semantic lines of an M3-Agent memory graph, one item each."""
    try:
        lines = graph_clip_lines(load_graph(path))
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise BadInput(f"{path}: malformed memory graph ({type(e).__name__}: {e})") from None
    if not lines:
        raise BadInput(f"{path}: the memory graph has no episodic or semantic lines")
    return line_items(lines, source, CLIP_SECONDS)


def read_structured_items(path: str | Path, source: str) -> list[Item]:
    """The translated lines of a structured memory graph written by `linmem.structured.save_graph`."""
    from ...structured import graph_items, load_graph  # networkx only when this memory is read

    items = graph_items(load_graph(path), source)
    if not items:
        raise BadInput(f"{path}: the structured memory has no episodic or semantic lines")
    return items


def _infer_split(data: dict[str, Any]) -> str:
    web = any(isinstance(entry, dict) and "video_url" in entry for entry in data.values())
    return "web" if web else "robot"
