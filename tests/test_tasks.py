"""Evaluation tasks on small files generated here in the published formats (M3-Bench annotations,
clip captions, M3-Agent memory-graph pickles, LoCoMo), plus the real data when it is present."""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from linmem.errors import BadInput
from linmem.evals.m3graph import Dropped, Graph, character_mappings, graph_clip_lines, load_graph, translate
from linmem.evals.metrics import keywords_of
from linmem.evals.standin import pickled_as_videograph
from linmem.evals.tasks import TASKS, Task, load_task
from linmem.evals.tasks.m3bench import M3BenchTask, normalize_type
from linmem.evals.tasks.synthetic import ClipRetrievalTask, NIAHTask, SummarizationTask
from linmem.render import render

T = TypeVar("T", bound=Task)


def load(cls: type[T], name: str, **options: Any) -> T:
    """`load_task`, checked to build the expected class."""
    task = load_task(name, **options)
    assert isinstance(task, cls)
    return task


# --- M3-Bench fixtures -------------------------------------------------------------------------


def robot_annotations() -> dict[str, Any]:
    def qa(
        video: str, n: int, ts: str, before: int, kinds: list[str], *, answer: str = "In the cupboard."
    ) -> dict:
        return {
            "question": f"Question {n} about {video}?",
            "answer": answer,
            "question_id": f"{video}_Q{n:02d}",
            "reasoning": "因为……",
            "timestamp": ts,
            "type": kinds,
            "before_clip": before,
        }

    return {
        "kitchen_01": {
            "video_path": "data/videos/robot/kitchen_01.mp4",
            "mem_path": "data/memory_graphs/robot/kitchen_01.pkl",
            "qa_list": [
                qa("kitchen_01", 1, "01:35", 2, ["Multi-Detail Reasoning", "Human Understanding"]),
                qa("kitchen_01", 2, "00:43", 0, ["Cross-Modal Reasoning"], answer="Coffee."),
            ],
        },
        "study_02": {
            "video_path": "data/videos/robot/study_02.mp4",
            "mem_path": "data/memory_graphs/robot/study_02.pkl",
            "qa_list": [qa("study_02", 1, "01:10", 1, ["Person Understanding", "Multi-Hop Reasoning"])],
        },
    }


def web_annotations() -> dict[str, Any]:
    return {
        "aB3-xYz_9Qk": {
            "video_path": "data/videos/web/aB3-xYz_9Qk.mp4",
            "mem_path": "data/memory_graphs/web/aB3-xYz_9Qk.pkl",
            "video_url": "https://www.youtube.com/watch?v=aB3-xYz_9Qk",
            "qa_list": [
                {
                    "question": "Why does the host laugh?",
                    "answer": "The dog steals the cake.",
                    "question_id": "aB3-xYz_9Qk_Q1",
                    "reasoning": "The dog runs off with it.",
                    "type": ["Multi-Evidence Reasoning", "Person Understanding"],
                }
            ],
        }
    }


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


def caption_lines(video: str, clips: int) -> list[dict[str, Any]]:
    lines = []
    for clip in range(clips):
        lines.append(
            {"clip": clip, "start": 30 * clip, "end": 30 * clip + 30, "caption": f"{video} clip {clip} a."}
        )
        lines.append(
            {"clip": clip, "start": 30 * clip, "end": 30 * clip + 30, "caption": f"{video} clip {clip} b."}
        )
    lines[0]["transcript"] = "Where is my mug?"
    return lines[2:3] + lines[:2] + lines[3:]  # one line out of order: items come back in clip order


@pytest.fixture
def m3_files(tmp_path: Path) -> dict[str, Path]:
    captions = tmp_path / "captions"
    captions.mkdir()
    for video, clips in (("kitchen_01", 5), ("study_02", 4)):
        text = "\n".join(json.dumps(line) for line in caption_lines(video, clips))
        (captions / f"{video}.jsonl").write_text(text + "\n", encoding="utf-8")
    return {
        "robot": write_json(tmp_path / "robot.json", robot_annotations()),
        "web": write_json(tmp_path / "web.json", web_annotations()),
        "captions": captions,
    }


# --- LoCoMo fixture ----------------------------------------------------------------------------


def _turn(session: int, index: int, speaker: str, topic: str, **extra: Any) -> dict[str, Any]:
    text = f"{speaker} talks about {topic} in session {session}. " + "Lorem ipsum dolor sit amet. " * 4
    return {"speaker": speaker, "dia_id": f"D{session}:{index}", "text": text.strip(), **extra}


def conversation(
    sample_id: str, a: str, b: str, sessions: list[int], qa: list[dict[str, Any]]
) -> dict[str, Any]:
    conv: dict[str, Any] = {"speaker_a": a, "speaker_b": b}
    for n in sessions:
        conv[f"session_{n}_date_time"] = f"1:{n:02d} pm on {n} May, 2023"
        conv[f"session_{n}"] = [
            _turn(n, 1, a, f"{sample_id} topic {n}"),
            _turn(n, 2, b, f"{sample_id} reply {n}"),
        ]
    conv[f"session_{max(sessions) + 1}_date_time"] = "a date with no session"
    return {"sample_id": sample_id, "conversation": conv, "qa": qa, "event_summary": {}, "observation": {}}


def locomo_data() -> list[dict[str, Any]]:
    conv_a = conversation(
        "conv-a",
        "Alice",
        "Bob",
        [1, 2, 3, 4, 5, 10],
        [
            {
                "question": "When did Alice adopt a cat?",
                "answer": "8 May 2023",
                "evidence": ["D1:2"],
                "category": 2,
            },
            {
                "question": "Which pets?",
                "answer": "A cat, a dog",
                "evidence": ["D2:1", "D10:2"],
                "category": 1,
            },
            {
                "question": "What did Bob realize after the race?",
                "adversarial_answer": "self-care matters",
                "evidence": ["D3:1"],
                "category": 5,
            },
            {
                "question": "Where does Bob work?",
                "answer": "a bakery",
                "evidence": ["D", "D4:1; D5:2"],
                "category": 4,
            },
            {"question": "Would Alice like hiking?", "answer": "Likely yes", "evidence": [], "category": 3},
            {
                "question": "When did Bob paint?",
                "answer": 2022,
                "evidence": ["D:11:26", "D3:2"],
                "category": 2,
            },
        ],
    )
    photo = {"img_url": ["https://example.org/cat.jpg"], "blip_caption": "a photo of a cat", "query": "cat"}
    conv_a["conversation"]["session_1"][1].update(photo)
    conv_b = conversation(
        "conv-b",
        "Carol",
        "Dan",
        [1, 2, 3, 4],
        [
            {
                "question": f"What did Carol do in week {n}?",
                "answer": f"Painted fence {n}",
                "evidence": [f"D{n}:1"],
                "category": 4,
            }
            for n in (1, 2, 3, 4)
        ],
    )
    conv_c = conversation(
        "conv-c",
        "Erin",
        "Frank",
        [1, 2, 3],
        [{"question": "Where did Erin travel?", "answer": "Lisbon", "evidence": ["D2:1"], "category": 1}],
    )
    return [conv_a, conv_b, conv_c]


@pytest.fixture
def locomo_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "locomo.json", locomo_data())


# --- registry ----------------------------------------------------------------------------------


def test_registry_names_every_task() -> None:
    assert TASKS == ("m3bench", "locomo", "clip_retrieval", "niah", "summarization")


def test_unknown_task_lists_the_tasks() -> None:
    with pytest.raises(
        BadInput, match=r"unknown task 'nope'.*m3bench, locomo, clip_retrieval, niah, summarization"
    ):
        load_task("nope")


def test_unknown_option_names_it_and_lists_accepted(locomo_file: Path) -> None:
    with pytest.raises(BadInput, match=r"unknown option 'bogus' for task 'locomo'.*path, mode, categories"):
        load_task("locomo", path=str(locomo_file), bogus=1)
    with pytest.raises(
        BadInput, match=r"unknown option 'annotations' for task 'clip_retrieval'.*contexts.*path"
    ):
        load_task("clip_retrieval", base="locomo", path=str(locomo_file), annotations="x")
    with pytest.raises(BadInput, match=r"task 'locomo' needs option 'path'"):
        load_task("locomo")
    with pytest.raises(BadInput, match=r"task 'clip_retrieval' needs option 'base'"):
        load_task("clip_retrieval", path=str(locomo_file))
    with pytest.raises(BadInput, match=r"task 'niah' needs option 'path'"):
        load_task("niah")
    with pytest.raises(BadInput, match=r"unknown base 'niah'"):
        load_task("niah", base="niah")


def test_bad_option_values_are_bad_input(locomo_file: Path) -> None:
    path = str(locomo_file)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("locomo", {"path": path, "mode": "chat"}),
        ("locomo", {"path": path, "categories": [6]}),
        ("clip_retrieval", {"base": "locomo", "path": path, "contexts": [0]}),
        ("clip_retrieval", {"base": "locomo", "path": path, "distractors": "near"}),
        ("niah", {"path": path, "depth": 1.5}),
        ("niah", {"path": path, "chars_per_token": 0}),
        ("summarization", {"path": path, "n": 0}),
        ("m3bench", {"annotations": path, "memory": "video"}),
        ("m3bench", {"annotations": path, "split": "train"}),
        ("m3bench", {"annotations": 7}),
        ("m3bench", {"annotations": path, "memory_dir": 7}),
        ("locomo", {"path": ["a.json"]}),
    ]
    for name, options in cases:
        with pytest.raises(BadInput):
            load_task(name, **options)


# --- M3-Bench ------------------------------------------------------------------------------------


def test_normalize_type_merges_renamed_labels() -> None:
    assert normalize_type("Multi-Detail Reasoning") == normalize_type("Multi-Evidence Reasoning")
    assert (
        normalize_type(" human  understanding ")
        == normalize_type("Person Understanding")
        == "Person Understanding"
    )
    assert normalize_type("Something New") == "Something New"


def test_m3bench_robot_examples(m3_files: dict[str, Path]) -> None:
    task = load(M3BenchTask, "m3bench", annotations=str(m3_files["robot"]))
    assert task.split == "robot" and len(task) == 3
    by_id = {e.id: e for e in task}
    q1 = by_id["kitchen_01_Q01"]
    assert (q1.kind, q1.source, q1.answer, q1.upto) == ("qa", "kitchen_01", "In the cupboard.", 2)
    assert q1.types == ("Multi-Evidence Reasoning", "Person Understanding")
    assert q1.meta["timestamp"] == "01:35" and q1.meta["reasoning"] == "因为……"
    # Within a video, examples come in ask-time order (a memory that only grows).
    assert [e.id for e in task] == ["kitchen_01_Q02", "kitchen_01_Q01", "study_02_Q01"]


def test_m3bench_web_split_is_inferred(m3_files: dict[str, Path]) -> None:
    task = load(M3BenchTask, "m3bench", annotations=str(m3_files["web"]))
    assert task.split == "web"
    (e,) = task
    assert e.upto is None and e.source == "aB3-xYz_9Qk" and "timestamp" not in e.meta
    assert e.types == ("Multi-Evidence Reasoning", "Person Understanding")
    # The robot annotations read as web when told so: before_clip is then not used.
    assert all(e.upto is None for e in load_task("m3bench", annotations=str(m3_files["robot"]), split="web"))


def test_m3bench_web_file_as_robot_names_the_missing_field(m3_files: dict[str, Path]) -> None:
    with pytest.raises(BadInput, match=r"web\.json.*'aB3-xYz_9Qk_Q1'.*missing field 'timestamp'"):
        load_task("m3bench", annotations=str(m3_files["web"]), split="robot")


@pytest.mark.parametrize(
    ("drop", "pattern"),
    [
        (
            "before_clip",
            r"robot\.json: video 'kitchen_01' question 'kitchen_01_Q01': missing field 'before_clip'",
        ),
        ("answer", r"question 'kitchen_01_Q01': missing field 'answer'"),
        ("question_id", r"video 'kitchen_01' question '#0': missing field 'question_id'"),
    ],
)
def test_m3bench_missing_field(tmp_path: Path, drop: str, pattern: str) -> None:
    data = robot_annotations()
    del data["kitchen_01"]["qa_list"][0][drop]
    with pytest.raises(BadInput, match=pattern):
        load_task("m3bench", annotations=str(write_json(tmp_path / "robot.json", data)))


def test_m3bench_bad_annotation_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(BadInput, match=r"bad\.json:1: invalid JSON"):
        load_task("m3bench", annotations=str(bad))
    with pytest.raises(BadInput, match=r"missing\.json: cannot read"):
        load_task("m3bench", annotations=str(tmp_path / "missing.json"))
    with pytest.raises(BadInput, match=r"video 'v': missing field 'qa_list'"):
        load_task("m3bench", annotations=str(write_json(tmp_path / "x.json", {"v": {"video_path": "v.mp4"}})))


def test_m3bench_caption_memory_and_upto(m3_files: dict[str, Path]) -> None:
    task = load_task("m3bench", annotations=str(m3_files["robot"]), memory_dir=str(m3_files["captions"]))
    items = task.items("kitchen_01")
    assert len(items) == 10 and [i.clip for i in items] == sorted(i.clip or 0 for i in items)
    assert items[0].text == 'kitchen_01 clip 0 a. Speech: "Where is my mug?"'
    assert (items[0].time, items[0].source) == ("00:00-00:30", "kitchen_01")
    assert items[-1].time == "02:00-02:30"
    by_id = {e.id: e for e in task}
    assert {i.clip for i in task.memory(by_id["kitchen_01_Q01"])} == {0, 1, 2}
    assert {i.clip for i in task.memory(by_id["kitchen_01_Q02"])} == {0}


def test_m3bench_caption_errors(m3_files: dict[str, Path], tmp_path: Path) -> None:
    robot, captions = str(m3_files["robot"]), m3_files["captions"]
    lines = (captions / "study_02.jsonl").read_text(encoding="utf-8").splitlines()
    (captions / "study_02.jsonl").write_text("\n".join([*lines[:2], "{oops", *lines[2:]]), encoding="utf-8")
    task = load_task("m3bench", annotations=robot, memory_dir=str(captions))
    with pytest.raises(BadInput, match=r"study_02\.jsonl:3: invalid JSON"):
        task.items("study_02")
    (captions / "study_02.jsonl").write_text('{"clip": 0, "start": 0, "end": 30}\n', encoding="utf-8")
    with pytest.raises(BadInput, match=r"study_02\.jsonl:1: missing field 'caption'"):
        task.items("study_02")
    (captions / "study_02.jsonl").write_bytes(
        b'{"clip": 0, "caption": "ok"}\n{"clip": 1, "caption": "\xff"}\n'
    )
    with pytest.raises(BadInput, match=r"study_02\.jsonl:2: not UTF-8"):
        task.items("study_02")
    (captions / "study_02.jsonl").unlink()
    with pytest.raises(BadInput, match=r"video 'study_02': expected .*study_02\.jsonl"):
        task.items("study_02")
    with pytest.raises(BadInput, match=r"needs memory_dir"):
        load_task("m3bench", annotations=robot).items("kitchen_01")
    with pytest.raises(BadInput, match=r"unknown M3-Bench video"):
        task.items("garage_09")
    with pytest.raises(BadInput, match=r"not a directory"):
        load_task("m3bench", annotations=robot, memory_dir=str(tmp_path / "nowhere"))


# --- memory graphs -------------------------------------------------------------------------------


@contextmanager
def fake_videograph(module_name: str) -> Iterator[type]:
    """Stand-in VideoGraph classes importable as `module_name` only while pickling (no real module
    of that name may be there: the test would pickle against it)."""
    assert module_name.partition(".")[0] not in sys.modules and module_name not in sys.modules
    with pickled_as_videograph(module_name) as VideoGraph:
        yield VideoGraph
    assert module_name not in sys.modules


def build_graph(VideoGraph: type, *, by_clip: bool = True, embeddings: Any = None) -> Any:
    g = VideoGraph()
    g.nodes, g.edges, g.text_nodes, g.next_node_id = {}, {}, [], 0
    g.text_nodes_by_clip = defaultdict(list)
    # Stale mappings in the pickle are ignored: the loader recomputes them from the lines.
    g.character_mappings = {"character_9": ["face_0"]}
    g.reverse_character_mappings = {"face_0": "character_9"}

    def add(kind: str, text: str | None = None, clip: int | None = None) -> int:
        node = VideoGraph.Node(g.next_node_id, kind)  # type: ignore[attr-defined]
        node.embeddings = [embeddings] if embeddings is not None else [[0.1, 0.2]]
        node.metadata = {"contents": [text] if text else ["base64-face-crop"]}
        if clip is not None:
            node.metadata["timestamp"] = clip
            g.text_nodes.append(node.id)
            g.text_nodes_by_clip[clip].append(node.id)
        g.nodes[node.id] = node
        g.next_node_id += 1
        return node.id

    add("img"), add("voice"), add("img"), add("voice")  # face_0, voice_1, face_2, voice_3
    add("episodic", "<face_0> picks up a red mug.", 0)
    add("semantic", "Equivalence: <face_0>, <voice_1>", 0)
    add("episodic", "<voice_1> says hello to <face_2>.", 0)
    add("semantic", "<face_2> is Lily's friend.", 1)
    add("episodic", "<voice_3> laughs; face_0 waves at <face_7>.", 1)
    add("semantic", "equivalence: <voice_3>, <face_42>", 1)  # face_42 is no node: nothing to merge
    if not by_clip:
        del g.text_nodes_by_clip
    return g


EXPECTED_LINES = {
    0: [
        ("episodic", "<character_0> picks up a red mug."),
        ("episodic", "<character_0> says hello to <character_1>."),
    ],
    1: [
        ("semantic", "<character_1> is Lily's friend."),
        ("episodic", "<character_2> laughs; character_0 waves at <face_7>."),
    ],
}


def write_graph(path: Path, module: str = "mmagent.videograph", protocol: int = 4, **kwargs: Any) -> Path:
    with fake_videograph(module) as VideoGraph:
        path.write_bytes(pickle.dumps(build_graph(VideoGraph, **kwargs), protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("module", ["mmagent.videograph", "videograph"])
def test_graph_loads_without_importing_mmagent(tmp_path: Path, module: str, protocol: int) -> None:
    path = write_graph(tmp_path / "g.pkl", module, protocol)
    graph = load_graph(path)
    assert "mmagent" not in sys.modules and "videograph" not in sys.modules
    assert isinstance(graph, Graph) and type(graph.nodes[0]) is Graph.Node
    assert graph_clip_lines(graph) == EXPECTED_LINES


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_graph_numpy_embeddings_become_placeholders(tmp_path: Path, protocol: int) -> None:
    emb = [np.arange(4, dtype=np.float32), np.float32(0.5)]
    graph = load_graph(write_graph(tmp_path / "g.pkl", protocol=protocol, embeddings=emb))
    assert all(isinstance(x, Dropped) for x in graph.nodes[4].embeddings[0])
    assert graph_clip_lines(graph) == EXPECTED_LINES


def test_graph_without_clip_index_uses_node_timestamps(tmp_path: Path) -> None:
    graph = load_graph(write_graph(tmp_path / "g.pkl", by_clip=False))
    assert graph_clip_lines(graph) == EXPECTED_LINES


def test_character_mappings_union_equivalences(tmp_path: Path) -> None:
    mapping = character_mappings(load_graph(write_graph(tmp_path / "g.pkl")))
    assert mapping == {
        "face_0": "character_0",
        "voice_1": "character_0",
        "face_2": "character_1",
        "voice_3": "character_2",
    }


def test_translate_respects_tag_boundaries() -> None:
    mapping = {"face_1": "character_0", "voice_12": "character_3"}
    assert translate("<face_12> meets <face_1>; voice_12 and Face_1 talk", mapping) == (
        "<face_12> meets <character_0>; character_3 and character_0 talk"
    )


class Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(Evil(f"touch {marker}")))
    with pytest.raises(BadInput, match=rf"evil\.pkl: refused to load {os.system.__module__}\.system"):
        load_graph(path)
    # Hidden inside an otherwise valid graph.
    with fake_videograph("mmagent.videograph") as VideoGraph:
        graph = build_graph(VideoGraph)
        graph.nodes[4].metadata["extra"] = Evil(f"touch {marker}")
        path.write_bytes(pickle.dumps(graph, protocol=4))
    with pytest.raises(BadInput, match=r"refused to load"):
        load_graph(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "pattern"),
    [
        (b"cbuiltins\neval\n(V__import__('os')\ntR.", r"refused to load builtins\.eval"),
        (b"cbuiltins\ngetattr\n(cmmagent.videograph\nVideoGraph\nV__init__\ntR.", r"refused getattr"),
        (b"cposix\nsystem\n(Vtrue\ntR.", r"refused to load posix\.system"),
        (b"(I1\nI2\nl.", r"expected a pickled VideoGraph, found list"),
        (b"\x80\x04not a pickle", r"not a readable memory-graph pickle"),
    ],
)
def test_handcrafted_pickles_are_refused(tmp_path: Path, payload: bytes, pattern: str) -> None:
    path = tmp_path / "x.pkl"
    path.write_bytes(payload)
    with pytest.raises(BadInput, match=pattern):
        load_graph(path)


def test_m3bench_graph_memory(m3_files: dict[str, Path], tmp_path: Path) -> None:
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    write_graph(graphs / "kitchen_01.pkl")
    task = load_task("m3bench", annotations=str(m3_files["robot"]), memory="graph", memory_dir=str(graphs))
    items = task.items("kitchen_01")
    assert [(i.clip, i.meta["kind"], i.text) for i in items] == [
        (clip, kind, text) for clip, lines in EXPECTED_LINES.items() for kind, text in lines
    ]
    assert items[0].time == "00:00-00:30" and items[-1].time == "00:30-01:00"
    with pytest.raises(BadInput, match=r"no graph memory for video 'study_02': expected .*study_02\.pkl"):
        task.items("study_02")


# --- LoCoMo ----------------------------------------------------------------------------------------


def test_locomo_memory_items(locomo_file: Path) -> None:
    task = load_task("locomo", path=str(locomo_file))
    items = task.items("conv-a")
    assert [i.clip for i in items] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 10, 10]  # numeric session order
    first, photo = items[0], items[1]
    assert first.text.startswith("Alice: Alice talks about conv-a topic 1")
    assert (first.time, first.source, first.meta) == (
        "1:01 pm on 1 May, 2023",
        "conv-a",
        {"dia_id": "D1:1", "speaker": "Alice"},
    )
    assert photo.text.endswith(" [shares a photo: a photo of a cat]")
    with pytest.raises(BadInput, match=r"unknown LoCoMo conversation"):
        task.items("conv-z")


def test_locomo_qa_examples(locomo_file: Path) -> None:
    task = load_task("locomo", path=str(locomo_file))
    assert len(task) == 6 + 4 + 1
    by_id = {e.id: e for e in task}
    e = by_id["conv-a:1"]
    assert (e.kind, e.source, e.answer, e.gold_clips, e.types) == (
        "qa",
        "conv-a",
        "A cat, a dog",
        (2, 10),
        ("category 1",),
    )
    adversarial = by_id["conv-a:2"]
    assert adversarial.answer == "Not mentioned in the conversation."
    assert adversarial.meta["adversarial_answer"] == "self-care matters"
    assert by_id["conv-a:3"].gold_clips == (4, 5) and by_id["conv-a:3"].meta["bad_evidence"] == 1
    assert by_id["conv-a:5"].answer == "2022" and by_id["conv-a:5"].gold_clips == (3,)
    assert by_id["conv-a:5"].meta["bad_evidence"] == 1
    assert by_id["conv-a:4"].gold_clips == ()


def test_locomo_retrieval_mode_and_categories(locomo_file: Path) -> None:
    retrieval = load_task("locomo", path=str(locomo_file), mode="retrieval")
    assert all(e.kind == "retrieval" and e.gold_clips for e in retrieval)
    assert "conv-a:4" not in {e.id for e in retrieval} and len(retrieval) == 10
    only = load_task("locomo", path=str(locomo_file), categories=[2, 5])
    assert [e.id for e in only] == ["conv-a:0", "conv-a:2", "conv-a:5"]  # ids keep their place in the file


def test_locomo_bad_input(tmp_path: Path) -> None:
    data = locomo_data()
    del data[1]["qa"][2]["answer"]
    with pytest.raises(BadInput, match=r"conv-b qa #2: missing field 'answer'"):
        load_task("locomo", path=str(write_json(tmp_path / "l.json", data)))
    data = locomo_data()
    del data[2]["sample_id"]
    with pytest.raises(BadInput, match=r"conversation #2: missing field 'sample_id'"):
        load_task("locomo", path=str(write_json(tmp_path / "l.json", data)))
    data = locomo_data()
    del data[0]["conversation"]["session_2"][0]["text"]
    with pytest.raises(BadInput, match=r"conv-a session 2 turn #0: missing field 'text'"):
        load_task("locomo", path=str(write_json(tmp_path / "l.json", data)))
    with pytest.raises(BadInput, match=r"expected a list of conversations"):
        load_task("locomo", path=str(write_json(tmp_path / "l.json", {"conv": 1})))


# --- synthetic tasks -------------------------------------------------------------------------------


def _clip_texts(items: list[Any]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for item in items:
        out[item.clip].append(item.text)
    return dict(out)


def test_clip_retrieval_other_sources(locomo_file: Path) -> None:
    task = load(
        ClipRetrievalTask, "clip_retrieval", base="locomo", path=str(locomo_file), contexts=[4, 8], seed=3
    )
    base = task.base
    single = [e for e in base if len(e.gold_clips) == 1 and e.meta["category"] != 5]
    assert Counter(e.types for e in task) == {("N=4",): len(single), ("N=8",): len(single)}
    for e in task:
        n = e.meta["context"]
        memory = task.memory(e)
        clips = _clip_texts(memory)
        assert (e.kind, e.types, len(e.gold_clips)) == ("retrieval", (f"N={n}",), 1)
        assert list(clips) == list(range(n))  # renumbered 0..N-1 in memory order
        source, clip = e.meta["target"]
        target_items = [i for i in memory if i.clip == e.gold_clips[0]]
        assert [i.text for i in target_items] == [i.text for i in base.items(source) if i.clip == clip]
        assert {i.source for i in memory if i.clip != e.gold_clips[0]} <= {"conv-a", "conv-b", "conv-c"} - {
            source
        }
        assert e.question == {b.id: b for b in base}[e.meta["base_id"]].question
        assert len({tuple(t) for t in clips.values()}) == n  # N distinct clips


def test_clip_retrieval_mixed_takes_own_source_first(locomo_file: Path) -> None:
    # Sessions: conv-a 6, conv-b 4, conv-c 3.
    task = load(
        ClipRetrievalTask,
        "clip_retrieval",
        base="locomo",
        path=str(locomo_file),
        contexts=[3, 9],
        distractors="mixed",
        seed=5,
    )
    base = task.base
    for e in task:
        n, (source, clip) = e.meta["context"], e.meta["target"]
        memory = task.memory(e)
        clips = _clip_texts(memory)
        assert list(clips) == list(range(n)) and len({tuple(t) for t in clips.values()}) == n
        target_items = [i for i in memory if i.clip == e.gold_clips[0]]
        assert [i.text for i in target_items] == [i.text for i in base.items(source) if i.clip == clip]
        own = len({i.clip for i in base.items(source)})
        from_own = {i.clip for i in memory if i.source == source}
        # The target's own sessions come first: other conversations only fill what they cannot.
        assert len(from_own) == min(n, own)


def test_clip_retrieval_is_deterministic_per_seed(locomo_file: Path) -> None:
    def build(seed: int) -> list[tuple[Any, ...]]:
        task = load_task("clip_retrieval", base="locomo", path=str(locomo_file), contexts=[5], seed=seed)
        return [(e.id, e.gold_clips, e.question, render(task.memory(e))) for e in task]

    assert build(1) == build(1)
    assert build(1) != build(2)


def test_clip_retrieval_per_context_samples(locomo_file: Path) -> None:
    task = load_task("clip_retrieval", base="locomo", path=str(locomo_file), contexts=[3, 5], per_context=2)
    assert Counter(e.meta["context"] for e in task) == {3: 2, 5: 2}
    assert len({e.id for e in task}) == len({e.source for e in task}) == 4


def test_clip_retrieval_same_source_keeps_consecutive_ids(locomo_file: Path) -> None:
    options = {
        "base": "locomo",
        "path": str(locomo_file),
        "contexts": [3, 5],
        "distractors": "same",
        "seed": 7,
    }
    task = load(ClipRetrievalTask, "clip_retrieval", **options)
    # Sessions: conv-a 6, conv-b 4, conv-c 3; only conv-a fits N=5.
    assert {e.meta["target"][0] for e in task if e.meta["context"] == 5} == {"conv-a"}
    for e in task:
        source, clip = e.meta["target"]
        memory = task.memory(e)
        ids = list(_clip_texts(memory))
        all_ids = sorted({i.clip or 0 for i in task.base.items(source)})
        start = all_ids.index(ids[0])
        assert ids == all_ids[start : start + e.meta["context"]]
        assert e.gold_clips == (clip,) and clip in ids
        assert {i.source for i in memory} == {source}
    with pytest.raises(BadInput, match=r"no target fits"):
        load_task("clip_retrieval", base="locomo", path=str(locomo_file), contexts=[50], distractors="same")


def test_clip_retrieval_on_m3bench_queries_a_caption_line(m3_files: dict[str, Path]) -> None:
    task = load_task(
        "clip_retrieval",
        base="m3bench",
        annotations=str(m3_files["robot"]),
        memory_dir=str(m3_files["captions"]),
        contexts=[3],
    )
    assert len(task) == 9  # every clip of both videos is a target
    for e in task:
        memory = task.memory(e)
        gold_texts = [i.text for i in memory if i.clip == e.gold_clips[0]]
        assert e.question in gold_texts and e.answer is None
        assert len({i.source for i in memory}) == 2


def test_niah_budget_and_needle(locomo_file: Path) -> None:
    task = load(NIAHTask, "niah", path=str(locomo_file), budgets=[300, 600], per_budget=2, seed=5)
    assert Counter(e.types for e in task) == {("budget=300",): 2, ("budget=600",): 2}
    base = {e.id: e for e in task.base}
    for e in task:
        memory = task.memory(e)
        tokens = len(render(memory)) / 4
        assert 0.5 * e.meta["budget"] <= tokens <= 1.05 * e.meta["budget"]
        needle_source, needle_clips = e.meta["needle"]
        qa = base[e.meta["base_id"]]
        assert tuple(needle_clips) == qa.gold_clips and e.answer == qa.answer and e.question == qa.question
        assert e.keywords and e.keywords == keywords_of(qa.answer or "") and e.kind == "niah"
        needle = [(i.clip, i.source) for i in memory if i.source == needle_source]
        # The needle is the evidence sessions, whole and contiguous, and nothing else of that source.
        assert {c for c, _ in needle} == set(needle_clips)
        first = next(k for k, i in enumerate(memory) if i.source == needle_source)
        assert all(i.source == needle_source for i in memory[first : first + len(needle)])
        assert 0 <= e.meta["depth"] <= 1


def test_niah_depth_places_the_needle(locomo_file: Path) -> None:
    for depth, at_start in ((0.0, True), (1.0, False)):
        task = load_task("niah", path=str(locomo_file), budgets=[600], per_budget=3, depth=depth)
        for e in task:
            memory = task.memory(e)
            edge = memory[0] if at_start else memory[-1]
            assert edge.source == e.meta["needle"][0] and e.meta["depth"] == depth
    with pytest.raises(BadInput, match=r"niah budget 50: no needle fits"):
        load_task("niah", path=str(locomo_file), budgets=[50])


def test_niah_lays_sources_out_again_to_fill_a_large_budget(locomo_file: Path) -> None:
    task = load_task("niah", path=str(locomo_file), budgets=[5000], per_budget=2)
    for e in task:
        memory = task.memory(e)
        assert e.meta["passes"] > 1 and 0.9 * 5000 <= len(render(memory)) / 4 <= 5000
        assert sum(1 for i in memory if i.source == e.meta["needle"][0]) == 2 * len(e.meta["needle"][1])


def test_niah_on_m3bench_hides_the_video_up_to_the_question(m3_files: dict[str, Path]) -> None:
    task = load(
        NIAHTask,
        "niah",
        base="m3bench",
        annotations=str(m3_files["robot"]),
        memory_dir=str(m3_files["captions"]),
        budgets=[150],
        per_budget=3,
    )
    base = {e.id: e for e in task.base}
    assert len(task) >= 1
    for e in task:
        qa = base[e.meta["base_id"]]
        video, clips = e.meta["needle"]
        assert video == qa.source and clips == list(range((qa.upto or 0) + 1))
        memory = task.memory(e)
        assert {i.clip for i in memory if i.source == video} == set(clips)
        assert {i.source for i in memory} == {"kitchen_01", "study_02"}
        assert len(render(memory)) / 4 <= 150


def test_summarization_reads_only_the_evidence(locomo_file: Path) -> None:
    task = load(SummarizationTask, "summarization", path=str(locomo_file), n=4, seed=2)
    assert len(task) == 4
    base = {e.id: e for e in task.base}
    for e in task:
        qa = base[e.meta["base_id"]]
        assert qa.meta["category"] in (1, 2, 4) and len((qa.answer or "").split()) <= 5
        assert e.kind == "summary" and e.answer == qa.answer and e.keywords == keywords_of(qa.answer or "")
        assert e.keywords  # metrics refuse an empty keyword list
        memory = task.memory(e)
        assert {i.source for i in memory} == {qa.source}
        assert sorted({i.clip or 0 for i in memory}) == list(qa.gold_clips) == list(e.gold_clips)
        assert [i.text for i in memory] == [
            i.text for i in task.base.items(qa.source) if i.clip in qa.gold_clips
        ]
    all_of_them = load_task("summarization", path=str(locomo_file), n=100)
    assert len(all_of_them) == 9  # every short factual QA with evidence in the fixture
    with pytest.raises(BadInput, match=r"base must be 'locomo'"):
        load_task("summarization", base="m3bench", annotations="x.json")


# --- the real data, when this checkout can see it ----------------------------------------------------


def _real_data() -> Path | None:
    repo = Path(__file__).resolve().parent.parent
    for candidate in (repo / "shared" / "data", repo.parent / "shared" / "data"):
        if (candidate / "m3bench" / "robot.json").is_file() and (
            candidate / "locomo" / "locomo-dev.json"
        ).is_file():
            return candidate
    return None


@pytest.mark.skipif(_real_data() is None, reason="the real M3-Bench and LoCoMo files are not here")
def test_real_data_counts() -> None:
    data = _real_data()
    assert data is not None
    robot = load(M3BenchTask, "m3bench", annotations=str(data / "m3bench" / "robot.json"))
    assert robot.split == "robot" and len(robot) == 1276 and len({e.source for e in robot}) == 100
    assert all(e.upto is not None and e.upto >= 0 for e in robot)
    assert Counter(t for e in robot for t in e.types) == {
        "Multi-Evidence Reasoning": 842,
        "Person Understanding": 548,
        "Cross-Modal Reasoning": 476,
        "General Knowledge Extraction": 327,
        "Multi-Hop Reasoning": 85,
    }
    locomo = load_task("locomo", path=str(data / "locomo" / "locomo-dev.json"))
    assert len(locomo) == 1347 and len({e.source for e in locomo}) == 7
    assert Counter(e.meta["category"] for e in locomo) == {4: 563, 5: 312, 2: 214, 1: 192, 3: 66}
    assert sum(e.meta["bad_evidence"] for e in locomo) == 2
    assert len(load_task("locomo", path=str(data / "locomo" / "locomo-dev.json"), mode="retrieval")) == 1345


def test_stand_in_graphs_load_as_m3agent_graphs(tmp_path: Path) -> None:
    """`linmem eval --offline`'s stand-in memory graphs are M3-Agent pickles: the restricted
    loader reads them, with the face and the voice one character, and no module is left behind."""
    from linmem.evals.standin import graphs

    graphs(tmp_path, videos=1, clips=3)
    assert "mmagent" not in sys.modules and "mmagent.videograph" not in sys.modules
    lines = graph_clip_lines(load_graph(tmp_path / "kitchen_00.pkl"))
    assert sorted(lines) == [0, 1, 2]
    assert lines[0] == [
        ("episodic", "<character_0> puts the red mug in the left cupboard of the kitchen. (video 0, part 0)")
    ]
