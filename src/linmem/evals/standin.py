"""Stand-in data for ``linmem eval --offline``: small generated files in the publishers' formats.

Where the real data a task needs is absent (M3-Bench's clip captions and memory graphs are not
public outside the Hugging Face hub; a newcomer may have no data at all), `stand_in` generates
a stand-in in the same layout as ``$LINMEM_DATA`` and points the task at it, so that every
shipped config runs end to end offline. The files are deterministic (the same every run) and
tiny; reports say which tasks read them. Tests build their data with the same functions.

- `locomo`: a LoCoMo file, sessions of turns and QA whose evidence is one turn each;
- `m3bench`: an M3-Bench annotation file (robot or web format) and its clip captions;
- `graphs`: M3-Agent memory graphs (``VideoGraph`` pickles) of the same videos;
- `structured`: linmem's structured memory graphs of the same videos.
"""

from __future__ import annotations

import json
import pickle
import random
import sys
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import TaskConfig

PEOPLE = [("Caroline", "Melanie"), ("Jon", "Gina"), ("Ana", "Ben")]
TOPICS = [
    ("painting", "I painted a sunrise over the lake last weekend.", "a sunrise over the lake"),
    ("running", "I ran a half marathon in the rain on Sunday.", "a half marathon"),
    ("cooking", "I baked sourdough bread with rosemary yesterday.", "sourdough bread"),
    ("travel", "We booked a trip to Lisbon for the spring.", "Lisbon"),
    ("garden", "My tomatoes finally turned red this week.", "tomatoes"),
    ("music", "I started piano lessons with a teacher downtown.", "piano lessons"),
    ("books", "I am reading a novel about a lighthouse keeper.", "a lighthouse keeper novel"),
    ("pets", "We adopted a grey kitten called Pixel.", "a grey kitten called Pixel"),
]
ROBOT_CLIPS = [
    "Alice puts the red mug in the left cupboard of the kitchen.",
    "Bob waters the fern by the living room window.",
    "Alice tells Bob that her sister Clara visits on Saturday.",
    "Bob puts his car keys in the top drawer of the hallway cabinet.",
    "Alice cooks spaghetti with garlic and cherry tomatoes.",
    "The cat sleeps on the armchair next to the bookshelf.",
]
ROBOT_QA = [
    ("Where is the red mug?", "In the left cupboard.", 1, ["Multi-Detail Reasoning"]),
    ("Who visits on Saturday?", "Clara, Alice's sister.", 3, ["Human Understanding"]),
    ("Where are Bob's keys?", "In the top drawer of the hallway cabinet.", 5, ["Cross-Modal Reasoning"]),
]
STRUCTURED_CLIPS = [
    (["<person_1> puts the red mug in the left cupboard."], ["<person_1> keeps mugs in the left cupboard."]),
    (["<person_2> waters the fern by the window."], ["<person_2> looks after the plants."]),
    (["<face_3> tells <person_2> that Clara visits on Saturday."], ["Equivalence: <face_3>, <person_1>"]),
]
# The stand-in M3-Bench set: enough clips for the shipped configs' contexts (30 consecutive clips
# of one video; 100 candidates from other videos), few enough to generate in a blink.
VIDEOS, CLIPS = 5, 32


def locomo(path: Path, conversations: int = 3, sessions: int = 6, seed: int = 0) -> Path:
    """A LoCoMo-format file: sessions of turns, and QA whose evidence points at one turn each."""
    rng = random.Random(seed)
    data = []
    for c in range(conversations):
        a, b = PEOPLE[c % len(PEOPLE)]
        conv: dict[str, Any] = {"speaker_a": a, "speaker_b": b}
        qa: list[dict[str, Any]] = []
        for s in range(1, sessions + 1):
            conv[f"session_{s}_date_time"] = f"{s}:00 pm on {s} May, 2023"
            turns = []
            for t in range(1, 5):
                speaker = a if t % 2 else b
                topic, line, short = TOPICS[(c * sessions + s + t) % len(TOPICS)]
                text = f"{line} It was about {topic} for {speaker} in session {s} of chat {c}."
                turns.append({"speaker": speaker, "dia_id": f"D{s}:{t}", "text": text})
                if t == 1:
                    qa.append(
                        {
                            "question": f"What did {speaker} say about {topic} in session {s}?",
                            "answer": short,
                            "evidence": [f"D{s}:{t}"],
                            "category": rng.choice([1, 2, 3, 4]),
                        }
                    )
            conv[f"session_{s}"] = turns
        qa.append(
            {
                "question": f"What did {a} say about skydiving?",
                "evidence": ["D1:1"],
                "category": 5,
                "adversarial_answer": "it was scary",
            }
        )
        data.append({"sample_id": f"conv-{c}", "conversation": conv, "qa": qa})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _caption(v: int, i: int) -> str:
    return f"{ROBOT_CLIPS[i % 6]} (video {v}, part {i})"


def _video(v: int) -> str:
    return f"kitchen_{v:02d}"


def m3bench(
    folder: Path, videos: int = 2, clips: int = 6, web: bool = False, captions: Path | None = None
) -> tuple[Path, Path]:
    """A robot-format (or web-format) annotation file ``folder/{robot,web}.json`` and a captions
    folder (`captions`, default ``folder/captions``) of ``<video>.jsonl`` files."""
    captions = captions if captions is not None else folder / "captions"
    captions.mkdir(parents=True, exist_ok=True)
    annotations: dict[str, Any] = {}
    for v in range(videos):
        vid = _video(v)
        lines = [
            {
                "clip": i,
                "start": 30 * i,
                "end": 30 * i + 30,
                "caption": f"{ROBOT_CLIPS[i % 6]} (video {v}, part {i})",
            }
            for i in range(clips)
        ]
        (captions / f"{vid}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        annotations[vid] = {
            "video_path": f"data/videos/robot/{vid}.mp4",
            "mem_path": f"data/memory_graphs/robot/{vid}.pkl",
            "qa_list": [
                {
                    "question": q,
                    "answer": a,
                    "question_id": f"{vid}_Q{i + 1:02d}",
                    "reasoning": "",
                    "type": t,
                    "timestamp": f"{(before + 1) * 30 // 60:02d}:{(before + 1) * 30 % 60:02d}",
                    "before_clip": before,
                }
                for i, (q, a, before, t) in enumerate(ROBOT_QA)
            ],
        }
    if web:
        for vid, entry in annotations.items():
            entry["video_url"] = f"https://www.youtube.com/watch?v={vid}"
            for qa in entry["qa_list"]:
                del qa["timestamp"], qa["before_clip"]
    path = folder / ("web.json" if web else "robot.json")
    path.write_text(json.dumps(annotations), encoding="utf-8")
    return path, captions


def structured(folder: Path, videos: int = 2, clips: int = 6) -> Path:
    """Structured memory graphs (`linmem.structured`) of the videos `m3bench` generates."""
    from ..structured import Extraction, build_graph, parse_extraction, save_graph

    folder.mkdir(parents=True, exist_ok=True)
    for v in range(videos):
        extractions: list[tuple[int, Extraction]] = []
        for i in range(clips):
            episodic, semantic = STRUCTURED_CLIPS[i % len(STRUCTURED_CLIPS)]
            answer = {"episodic": [f"{e} (video {v}, part {i})" for e in episodic], "semantic": semantic}
            extractions.append((i, parse_extraction(json.dumps(answer))))
        save_graph(build_graph(_video(v), "stand-in", extractions), folder / f"{_video(v)}.json")
    return folder


def graphs(folder: Path, videos: int = 2, clips: int = 6) -> Path:
    """M3-Agent memory graphs (``<video>.pkl``, pickles of ``mmagent.videograph.VideoGraph``) of
    the videos `m3bench` generates: per clip one episodic line, and a face and a voice that an
    equivalence line makes one character."""
    folder.mkdir(parents=True, exist_ok=True)
    with pickled_as_videograph() as VideoGraph:
        for v in range(videos):
            graph = _graph(VideoGraph, v, clips)
            (folder / f"{_video(v)}.pkl").write_bytes(pickle.dumps(graph, protocol=4))
    return folder


def _graph(VideoGraph: Any, v: int, clips: int) -> Any:  # noqa: N803 (a class)
    g = VideoGraph()
    g.nodes, g.edges, g.text_nodes, g.next_node_id = {}, {}, [], 0
    g.text_nodes_by_clip, g.character_mappings, g.reverse_character_mappings = {}, {}, {}

    def add(kind: str, text: str | None = None, clip: int | None = None) -> None:
        node = VideoGraph.Node(g.next_node_id, kind)
        node.metadata = {"contents": [text] if text else ["face-crop"]}
        if clip is not None:
            node.metadata["timestamp"] = clip
            g.text_nodes.append(node.id)
            g.text_nodes_by_clip.setdefault(clip, []).append(node.id)
        g.nodes[node.id] = node
        g.next_node_id += 1

    add("img")  # face_0
    add("voice")  # voice_1
    add("semantic", "Equivalence: <face_0>, <voice_1>", 0)
    for i in range(clips):
        caption = ROBOT_CLIPS[i % 6].replace("Alice", "<face_0>")
        add("episodic", f"{caption} (video {v}, part {i})", i)
    return g


_PICKLING = threading.Lock()
GRAPH_MODULE = "mmagent.videograph"


@contextmanager
def pickled_as_videograph(module_name: str = GRAPH_MODULE) -> Iterator[Any]:
    """Classes that pickle as M3-Agent's ``VideoGraph`` (and its ``Node``) of `module_name`
    (``mmagent.videograph``): pickle names a class by module and name and checks that the module
    has it, so the module is importable while the block runs, and only then. Nothing is ever
    unpickled with these."""

    class VideoGraph:
        class Node:
            def __init__(self, node_id: int, node_type: str) -> None:
                self.id = node_id
                self.type = node_type
                self.embeddings: list[Any] = []
                self.metadata: dict[str, Any] = {}

    VideoGraph.__module__ = VideoGraph.Node.__module__ = module_name
    VideoGraph.__qualname__, VideoGraph.Node.__qualname__ = "VideoGraph", "VideoGraph.Node"
    module = types.ModuleType(module_name)
    module.VideoGraph = VideoGraph  # type: ignore[attr-defined]
    made = [module]
    if "." in module_name:
        package, _, child = module_name.partition(".")
        made.append(types.ModuleType(package))
        setattr(made[-1], child, module)
    with _PICKLING:
        added = {m.__name__: m for m in made if m.__name__ not in sys.modules}
        sys.modules.update(added)
        try:
            yield VideoGraph
        finally:
            for name in added:
                sys.modules.pop(name, None)


# Standing in for a config's missing data


def stand_in(tasks: tuple[TaskConfig, ...], root: Path) -> tuple[tuple[TaskConfig, ...], tuple[str, ...]]:
    """The tasks with each one whose real data is absent pointed at stand-in data generated under
    `root` (laid out as ``$LINMEM_DATA``), and a note for the report per task that was."""
    made: dict[tuple[str, ...], dict[str, str]] = {}
    out, notes = [], []
    for task in tasks:
        # A task reads a base task's data: its own (locomo, m3bench) or its `base` (synthetic
        # tasks; niah and summarization default to LoCoMo, clip_retrieval must name one).
        base = task.name if task.name in ("locomo", "m3bench") else task.options.get("base", "locomo")
        replaced = (_locomo if base == "locomo" else _m3bench)(task, root, made)
        if replaced is None:
            out.append(task)
            continue
        new, note = replaced
        out.append(new)
        notes.append(f"stand-in data for task {task.label!r}: {note}")
    return tuple(out), tuple(notes)


def _absent(value: Any, *, folder: bool = False) -> bool:
    if not isinstance(value, str):
        return True
    return not (Path(value).is_dir() if folder else Path(value).is_file())


def _locomo(task: TaskConfig, root: Path, made: dict[tuple[str, ...], dict[str, str]]) -> Any:
    path = task.options.get("path")
    if not _absent(path):
        return None
    if ("locomo",) not in made:
        made[("locomo",)] = {"path": str(locomo(root / "locomo" / "locomo-dev.json"))}
    options = task.options | made[("locomo",)]
    note = f"{made[('locomo',)]['path']} (3 generated conversations), as {path} is not there"
    if options.pop("conversations", None) is not None:
        note += "; the config's conversations filter names real conversations, so it is dropped"
    return replace(task, options=options), note


_MEMORY_FOLDERS = {"captions": "captions", "graph": "memory_graphs", "structured": "structured"}


def _m3bench(task: TaskConfig, root: Path, made: dict[tuple[str, ...], dict[str, str]]) -> Any:
    annotations, memory_dir = task.options.get("annotations"), task.options.get("memory_dir")
    kind = task.options.get("memory", "captions")
    if not (_absent(annotations) or _absent(memory_dir, folder=True)) or kind not in _MEMORY_FOLDERS:
        return None  # the real data is there (or the task fails on its own, naming what is wrong)
    split = task.options.get("split") or ("web" if Path(str(annotations)).stem == "web" else "robot")
    key = ("m3bench", str(split), str(kind))
    if key not in made:
        folder = root / "m3bench"
        memory = folder / _MEMORY_FOLDERS[kind] / str(split)
        path, _ = m3bench(
            folder, VIDEOS, CLIPS, web=split == "web", captions=folder / "captions" / str(split)
        )
        if kind == "graph":
            graphs(memory, VIDEOS, CLIPS)
        elif kind == "structured":
            structured(memory, VIDEOS, CLIPS)
        made[key] = {"annotations": str(path), "memory_dir": str(memory)}
    missing = annotations if _absent(annotations) else memory_dir
    note = (
        f"{made[key]['annotations']} and {made[key]['memory_dir']} ({VIDEOS} generated videos of "
        f"{CLIPS} clips, {kind}), as {missing} is not there"
    )
    return replace(task, options=task.options | made[key]), note


__all__ = ["graphs", "locomo", "m3bench", "stand_in", "structured"]
