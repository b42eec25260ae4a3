"""Structured memory from captions: parsing, characters, the graph file, rendering, and extraction
end to end against a real OpenAI-compatible HTTP server and the tiny random-weights model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import networkx as nx
import pytest
from datagen import m3bench, structured
from openai_server import OpenAIServer

from linmem.engines import load_engine
from linmem.errors import BadInput, EngineError
from linmem.evals.tasks import load_task
from linmem.structured import (
    Extraction,
    build_graph,
    characters,
    extract,
    graph_items,
    load_graph,
    parse_extraction,
    render_json,
    save_graph,
)
from linmem.types import Item

# --- parsing -----------------------------------------------------------------------------------


def test_parse_plain_json() -> None:
    text = json.dumps(
        {
            "episodic": ["<person_1> opens the fridge.", "<person_1> takes out milk."],
            "semantic": ["<person_1> drinks milk every morning."],
            "equivalences": [["<face_2>", "<voice_3>"]],
        }
    )
    assert parse_extraction(text) == Extraction(
        ("<person_1> opens the fridge.", "<person_1> takes out milk."),
        ("<person_1> drinks milk every morning.",),
        (("<face_2>", "<voice_3>"),),
    )


def test_parse_fenced_answer_with_think_block_and_prose() -> None:
    text = (
        '<think>Maybe {"episodic": ["wrong"]} is right?</think>\n'
        "Here is the memory:\n```json\n"
        '{"episodic": ["<person_1> waves."], "semantic": []}\n'
        "```\nHope this helps {really}."
    )
    assert parse_extraction(text) == Extraction(("<person_1> waves.",), ())


def test_parse_template_opened_and_unclosed_think_blocks() -> None:
    opened = 'reasoning about {"episodic": ["no"]}</think>{"episodic": ["<person_1> sits."]}'
    assert parse_extraction(opened).episodic == ("<person_1> sits.",)
    with pytest.raises(BadInput):
        parse_extraction('<think>{"episodic": ["<person_1> sits."]} and then I ran out of tok')


def test_parse_key_variants_python_dict_and_string_lines() -> None:
    text = (
        "{'video_descriptions': '- <Face_1> enters.\\n- <face_1> sits down.', "
        "'High level conclusions': ['<face_1> is a guest.', 'Equivalence: <face_1>, <voice_4>'], "
        "'equivalence': '<voice_4> = <person_2>'}"
    )
    assert parse_extraction(text) == Extraction(
        ("<face_1> enters.", "<face_1> sits down."),
        ("<face_1> is a guest.",),
        (("<face_1>", "<voice_4>"), ("<voice_4>", "<person_2>")),
    )
    for key in ("episodic_memory", "video_description"):
        assert parse_extraction(json.dumps({key: ["<person_1> runs."]})).episodic == ("<person_1> runs.",)
    assert parse_extraction(json.dumps({"semantic_memory": ["<person_1> is tall."]})).semantic == (
        "<person_1> is tall.",
    )


def test_parse_equivalence_lines_move_out_of_semantic() -> None:
    text = json.dumps(
        {
            "episodic": ["<face_1> greets <voice_2>."],
            "semantic": ["Equivalence: <face_1>, <voice_2>", "equivalence: <face_5>, <voice_6>, <face_7>"],
            "equivalences": ["<person_3>, <face_1>", ["person_3", "<face_1>"]],
        }
    )
    assert parse_extraction(text) == Extraction(
        ("<face_1> greets <voice_2>.",),
        (),
        (
            ("<face_1>", "<voice_2>"),
            ("<face_5>", "<voice_6>"),
            ("<face_5>", "<face_7>"),
            ("<person_3>", "<face_1>"),
        ),
    )


def test_parse_skips_unusable_objects_before_the_answer() -> None:
    text = 'The schema is {"type": "object"}. Answer: {"semantic": ["<person_1> likes tea."]}'
    assert parse_extraction(text).semantic == ("<person_1> likes tea.",)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("I cannot help with that.", r'no JSON object with "episodic" or "semantic" lines'),
        ('{"episodic": ["unterminated', r"no JSON object"),
        ('{"answer": "<person_1> waves."}', r"no JSON object"),
        ("[1, 2, 3]", r"no JSON object"),
        ("{'episodic': __import__('os').getcwd()}", r"no JSON object"),
        ('{"episodic": [], "semantic": [7]}', r"no episodic or semantic lines"),
        ("", r"no JSON object"),
    ],
)
def test_parse_garbage_is_bad_input(text: str, pattern: str) -> None:
    with pytest.raises(BadInput, match=pattern):
        parse_extraction(text)


# --- characters and the graph ---------------------------------------------------------------------

THREE_CLIPS = [
    (0, Extraction(("<face_1> waves to <voice_2>.",), ("<voice_2> is a neighbour.",))),
    (1, Extraction(("<person_5> sits down.",), (), (("<voice_2>", "<person_5>"),))),
    (
        2,
        Extraction(
            ("<face_7> talks to <voice_9>.",),
            ("<voice_9> owns the house.",),
            (("<person_5>", "<face_7>"), ("<voice_9>", "<face_1>")),
        ),
    ),
]


def test_characters_merge_equivalent_tags_in_order_of_first_appearance() -> None:
    graph = build_graph("house", "hand", THREE_CLIPS)
    assert characters(graph) == {
        "<face_1>": "character_0",
        "<voice_2>": "character_1",
        "<person_5>": "character_1",
        "<face_7>": "character_1",
        "<voice_9>": "character_0",
    }
    # The same sets, introduced in another order, are numbered by who appears first.
    swapped = build_graph("house", "hand", [(0, Extraction(("<voice_2> arrives.",), ())), *THREE_CLIPS])
    assert characters(swapped)["<voice_2>"] == "character_0"
    assert characters(swapped)["<face_1>"] == "character_1"


def test_equivalence_lines_and_odd_tags_in_hand_made_extractions() -> None:
    extraction = Extraction(
        ("<Face_1> waves.",),
        ("Equivalence: <face_1>, <voice_2>", "<voice_2> hums."),
        ((" <VOICE_2>", "<person_3>"),),
    )
    graph = build_graph("v", "m", [(0, extraction)])
    assert json.loads(render_json(graph)) == {"CLIP_0": ["<character_0> waves.", "<character_0> hums."]}
    assert set(characters(graph).values()) == {"character_0"}


def test_graph_nodes_and_edges() -> None:
    graph = build_graph("house", "hand", THREE_CLIPS)
    assert graph.graph == {"source": "house", "model": "hand"}
    entities = {n: d["index"] for n, d in graph.nodes(data=True) if d["type"] == "entity"}
    assert entities == {"<face_1>": 0, "<voice_2>": 1, "<person_5>": 2, "<face_7>": 3, "<voice_9>": 4}
    assert graph.nodes["episodic:2:0"] == {
        "type": "episodic",
        "clip": 2,
        "text": "<face_7> talks to <voice_9>.",
        "order": 3,
    }
    assert graph.nodes["semantic:0:0"]["order"] == 1
    assert set(graph["episodic:0:0"]) == {"<face_1>", "<voice_2>"}
    equivalences = {frozenset((a, b)) for a, b, d in graph.edges(data=True) if d["kind"] == "equivalence"}
    assert equivalences == {
        frozenset(p)
        for p in (("<voice_2>", "<person_5>"), ("<person_5>", "<face_7>"), ("<voice_9>", "<face_1>"))
    }
    assert graph.edges["<voice_2>", "<person_5>"]["clip"] == 1


def test_render_and_items() -> None:
    graph = build_graph("house", "hand", THREE_CLIPS)
    assert json.loads(render_json(graph)) == {
        "CLIP_0": ["<character_0> waves to <character_1>.", "<character_1> is a neighbour."],
        "CLIP_1": ["<character_1> sits down."],
        "CLIP_2": ["<character_1> talks to <character_0>.", "<character_0> owns the house."],
    }
    items = graph_items(graph, "house")
    assert items[0] == Item(
        text="<character_0> waves to <character_1>.",
        clip=0,
        time="00:00-00:30",
        source="house",
        meta={"kind": "episodic"},
    )
    assert [(i.clip, i.time, i.meta["kind"]) for i in items[1:]] == [
        (0, "00:00-00:30", "semantic"),
        (1, "00:30-01:00", "episodic"),
        (2, "01:00-01:30", "episodic"),
        (2, "01:00-01:30", "semantic"),
    ]


def test_render_json_keeps_unicode_and_sorts_clips_numerically() -> None:
    clips = [(10, Extraction(("<person_1> dit « bonjour ».",), ())), (9, Extraction(("<person_1> 笑.",), ()))]
    text = render_json(build_graph("v", "m", sorted(clips, key=lambda c: c[0])))
    assert text == '{"CLIP_9": ["<character_0> 笑."], "CLIP_10": ["<character_0> dit « bonjour »."]}'


def test_save_load_roundtrip(tmp_path: Path) -> None:
    graph = build_graph("house", "hand", THREE_CLIPS)
    path = save_graph(graph, tmp_path / "graphs" / "house.json")
    header = json.loads(path.read_text())
    assert (header["format"], header["version"], header["source"], header["model"]) == (
        "linmem-structured",
        1,
        "house",
        "hand",
    )
    loaded = load_graph(path)
    assert nx.utils.graphs_equal(graph, loaded)
    assert render_json(loaded) == render_json(graph)
    save_graph(loaded, path)  # overwrite in place: no temp file is left behind
    assert [p.name for p in path.parent.iterdir()] == ["house.json"]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("{not json", r"not a structured memory file \(not JSON"),
        ('{"format": "something-else", "version": 1}', r'expected "format": \'linmem-structured\''),
        ('{"format": "linmem-structured", "version": 7, "graph": {}}', r"version 7, this linmem reads 1"),
        ('{"format": "linmem-structured", "version": 1}', r"malformed structured memory graph \(KeyError"),
        (
            '{"format": "linmem-structured", "version": 1, "graph": {"nodes": [{"id": "x", "type": "blob"}], '
            '"edges": []}}',
            r"node 'x' has unknown type 'blob'",
        ),
        (
            '{"format": "linmem-structured", "version": 1, "graph": {"nodes": [{"id": "e", '
            '"type": "episodic", "clip": "3", "order": 0, "text": "hi"}], "edges": []}}',
            r"line node 'e' needs an integer 'clip'",
        ),
    ],
)
def test_bad_graph_files_name_the_file(tmp_path: Path, content: str, pattern: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(BadInput, match=re.escape(str(path)) + r": .*" + pattern):
        load_graph(path)


def test_missing_graph_file(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"missing\.json: cannot read the structured memory"):
        load_graph(tmp_path / "missing.json")


# --- extraction against a real HTTP server -------------------------------------------------------

CAPTIONS = {
    0: "A woman walks into the kitchen and puts a red mug in the left cupboard.",
    1: "A man waters the fern by the window, saying he loves plants.",
    2: "The man tells the woman that Clara visits on Saturday.",
}
ANSWERS: dict[int | str, str] = {
    0: json.dumps(
        {
            "episodic": [
                "<person_1> walks into the kitchen.",
                "<person_1> puts a red mug in the left cupboard.",
            ],
            "semantic": ["<person_1> keeps mugs in the left cupboard."],
            "equivalences": [],
        }
    ),
    1: "```json\n"
    + json.dumps(
        {
            "video_descriptions": ["<face_2> waters the fern by the window."],
            "high_level_conclusions": ["Equivalence: <face_2>, <voice_3>", "<voice_3> loves plants."],
        }
    )
    + "\n```",
    2: json.dumps(
        {
            "episodic": ["<voice_3> tells <person_1> that Clara visits on Saturday."],
            "semantic": ["<person_1> and <voice_3> expect Clara on Saturday."],
        }
    ),
}
EXPECTED_JSON = {
    "CLIP_0": [
        "<character_0> walks into the kitchen.",
        "<character_0> puts a red mug in the left cupboard.",
        "<character_0> keeps mugs in the left cupboard.",
    ],
    "CLIP_1": ["<character_1> waters the fern by the window.", "<character_1> loves plants."],
    "CLIP_2": [
        "<character_1> tells <character_0> that Clara visits on Saturday.",
        "<character_0> and <character_1> expect Clara on Saturday.",
    ],
}


STUDY = "Someone reads a book in the study."
ANSWERS[STUDY] = json.dumps({"episodic": ["<person_1> reads a book in the study."]})


class Scripted:
    """A chat endpoint that answers each caption from `ANSWERS` (keyed by clip, or by the caption
    itself); `bad` clips get garbage (`bad_times` times, or always when None) first. Records
    every request as (clip, messages)."""

    def __init__(self, bad: dict[int, int | None] | None = None) -> None:
        self.bad = dict(bad or {})
        self.calls: list[tuple[int, list[dict[str, Any]]]] = []

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        messages = request["messages"]
        match = re.search(r"Caption of clip (\d+):\n(.*)\n\nRules:", messages[0]["content"], re.DOTALL)
        assert match, messages[0]["content"]
        clip, caption = int(match.group(1)), match.group(2)
        self.calls.append((clip, messages))
        left = self.bad.get(clip, 0)
        if left is None or left > 0:
            if left is not None:
                self.bad[clip] = left - 1
            return {"content": "Sorry, I would rather describe the weather."}
        return {"content": ANSWERS.get(caption) or ANSWERS[clip]}


def caption_items(source: str = "kitchen_00") -> list[Item]:
    # Out of order on purpose: extraction goes in clip order.
    return [Item(text=CAPTIONS[c], clip=c, source=source) for c in (2, 0, 1)]


def cache_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_extract_end_to_end_with_a_retry(tmp_path: Path) -> None:
    chat = Scripted(bad={1: 1})
    cache = tmp_path / "cache.jsonl"
    seen: list[tuple[str, int, str]] = []
    with OpenAIServer(chat=chat) as server:
        engine = load_engine(f"openai:{server.url}#test-model")
        graphs = extract(caption_items(), engine, cache=cache, progress=lambda *a: seen.append(a))
    assert list(graphs) == ["kitchen_00"]
    graph = graphs["kitchen_00"]
    assert render_json(graph) == json.dumps(EXPECTED_JSON)
    assert graph.graph == {"source": "kitchen_00", "model": engine.id}
    assert [(i.clip, i.time, i.meta["kind"], i.text) for i in graph_items(graph, "kitchen_00")] == [
        (0, "00:00-00:30", "episodic", "<character_0> walks into the kitchen."),
        (0, "00:00-00:30", "episodic", "<character_0> puts a red mug in the left cupboard."),
        (0, "00:00-00:30", "semantic", "<character_0> keeps mugs in the left cupboard."),
        (1, "00:30-01:00", "episodic", "<character_1> waters the fern by the window."),
        (1, "00:30-01:00", "semantic", "<character_1> loves plants."),
        (2, "01:00-01:30", "episodic", "<character_1> tells <character_0> that Clara visits on Saturday."),
        (2, "01:00-01:30", "semantic", "<character_0> and <character_1> expect Clara on Saturday."),
    ]
    assert seen == [("kitchen_00", 0, "ok"), ("kitchen_00", 1, "ok"), ("kitchen_00", 2, "ok")]

    # The retry showed the model its bad answer and what was wrong with it.
    assert [clip for clip, _ in chat.calls] == [0, 1, 1, 2]
    retry = chat.calls[2][1]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert retry[1]["content"] == "Sorry, I would rather describe the weather."
    assert "could not be used (no JSON object" in retry[2]["content"]

    # Each prompt carries the caption and the entities earlier clips introduced.
    first, last = chat.calls[0][1][0]["content"], chat.calls[3][1][0]["content"]
    assert CAPTIONS[0] in first and "(none yet)" in first and "starting at 1" in first
    assert CAPTIONS[2] in last and "starting at 2" in last
    assert "<face_2> = <voice_3>: <voice_3> loves plants." in last
    assert "<person_1>: <person_1> keeps mugs in the left cupboard." in last

    lines = cache_lines(cache)
    assert [(e["clip"], e["attempt"], e["ok"]) for e in lines] == [
        (0, 0, True),
        (1, 0, False),
        (1, 1, True),
        (2, 0, True),
    ]
    assert lines[1]["reply"] == "Sorry, I would rather describe the weather."
    assert lines[2]["equivalences"] == [["<face_2>", "<voice_3>"]]
    assert lines[0]["model"] == engine.id and lines[0]["source"] == "kitchen_00"
    assert len(lines[0]["caption_sha256"]) == 64


def test_failed_clip_is_recorded_and_retried_on_rerun(tmp_path: Path) -> None:
    chat = Scripted(bad={1: None})
    cache = tmp_path / "cache.jsonl"
    out = tmp_path / "out"
    items = caption_items() + [Item(text=STUDY, clip=0, source="study_01")]
    with OpenAIServer(chat=chat) as server:
        engine = load_engine(f"openai:{server.url}#test-model")
        with pytest.raises(EngineError) as failure:
            for source, graph in extract(items, engine, cache=cache, retries=1).items():
                save_graph(graph, out / f"{source}.json")
        message = str(failure.value)
        assert "failed for 1 clip(s): kitchen_00 clip 1 (2 attempt(s), last: no JSON object" in message
        assert "1 later clip(s) not attempted" in message and str(cache) in message
        assert not out.exists()
        assert [clip for clip, _ in chat.calls] == [0, 1, 1, 0]  # the study clip is asked too
        assert [(e["source"], e["clip"], e["ok"]) for e in cache_lines(cache)] == [
            ("kitchen_00", 0, True),
            ("kitchen_00", 1, False),
            ("kitchen_00", 1, False),
            ("study_01", 0, True),
        ]

        # A crash mid-write leaves a torn line; the next run ignores it.
        with cache.open("a") as f:
            f.write('{"source": "kitchen_00", "clip": 2, "ok": tr')
        fixed = Scripted()
        server.chat = fixed
        graphs = extract(items, engine, cache=cache, retries=1)
    assert [clip for clip, _ in fixed.calls] == [1, 2]  # clip 0 and the study came from the cache
    assert json.loads(render_json(graphs["kitchen_00"])) == EXPECTED_JSON
    assert json.loads(render_json(graphs["study_01"])) == {
        "CLIP_0": ["<character_0> reads a book in the study."]
    }
    assert len(cache_lines(cache)) == 6

    # Everything is cached now: a third run asks nothing.
    assert extract(items, engine, cache=cache, retries=1).keys() == graphs.keys()
    assert [clip for clip, _ in fixed.calls] == [1, 2]


def test_changed_caption_is_asked_again(tmp_path: Path) -> None:
    chat = Scripted()
    cache = tmp_path / "cache.jsonl"
    with OpenAIServer(chat=chat) as server:
        engine = load_engine(f"openai:{server.url}#test-model")
        extract(caption_items()[1:2], engine, cache=cache)
        extract(
            [Item(text=CAPTIONS[0] + " Then she leaves.", clip=0, source="kitchen_00")], engine, cache=cache
        )
    assert [clip for clip, _ in chat.calls] == [0, 0]


def test_corrupt_cache_line_is_bad_input(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    cache.write_text('{"source": "kitchen_00"}\n')
    with OpenAIServer(chat=Scripted()) as server:
        engine = load_engine(f"openai:{server.url}#test-model")
        with pytest.raises(BadInput, match=re.escape(str(cache)) + r":1: not an extraction cache line"):
            extract(caption_items(), engine, cache=cache)


def test_bad_caption_items(tmp_path: Path) -> None:
    engine = load_engine("tiny:qwen3.5")
    cache = tmp_path / "cache.jsonl"
    with pytest.raises(BadInput, match=r"has no source"):
        extract([Item(text="x", clip=0)], engine, cache=cache)
    with pytest.raises(BadInput, match=r"needs a clip number"):
        extract([Item(text="x", source="v")], engine, cache=cache)
    with pytest.raises(BadInput, match=r"no caption items"):
        extract([], engine, cache=cache)
    assert not cache.exists()


def test_tiny_random_model_failure_is_recorded(tmp_path: Path) -> None:
    engine = load_engine("tiny:qwen3.5")
    cache = tmp_path / "cache.jsonl"
    with pytest.raises(EngineError, match=r"kitchen_00 clip 0 \(2 attempt\(s\).*1 later clip"):
        extract(caption_items()[1:], engine, cache=cache, retries=1, max_new_tokens=8)
    lines = cache_lines(cache)
    assert [(e["clip"], e["attempt"], e["ok"], e["model"]) for e in lines] == [
        (0, 0, False, "tiny:qwen3.5"),
        (0, 1, False, "tiny:qwen3.5"),
    ]
    assert all(e["error"] and isinstance(e["reply"], str) for e in lines)


# --- the M3-Bench task ------------------------------------------------------------------------------


def test_m3bench_reads_structured_memory(tmp_path: Path) -> None:
    annotations, _ = m3bench(tmp_path / "m3", videos=2, clips=4)
    folder = structured(tmp_path / "structured", videos=1, clips=4)
    task = load_task("m3bench", annotations=str(annotations), memory="structured", memory_dir=str(folder))
    items = task.items("kitchen_00")
    assert items == graph_items(load_graph(folder / "kitchen_00.json"), "kitchen_00")
    assert [(i.clip, i.time, i.meta["kind"]) for i in items[:3]] == [
        (0, "00:00-00:30", "episodic"),
        (0, "00:00-00:30", "semantic"),
        (1, "00:30-01:00", "episodic"),
    ]
    assert (
        items[4].text == "<character_0> tells <character_1> that Clara visits on Saturday. (video 0, part 2)"
    )
    with pytest.raises(
        BadInput, match=r"no structured memory for video 'kitchen_01': expected .*kitchen_01\.json"
    ):
        task.items("kitchen_01")


def test_cli_ingest_then_structure_then_read(tmp_path: Path, linmem_home: Path, capsys) -> None:
    """Captions in, `linmem structure` out: the structured lines are a memory of their own, and the
    exported graph is what an eval's ``memory = "structured"`` reads."""
    from linmem import cli
    from linmem.memory import open_memory

    captions = tmp_path / "kitchen_00.jsonl"
    captions.write_text(
        "".join(json.dumps({"clip": c, "start": 20 * c, "end": 20 * c + 20, "caption": t}) + "\n"
                for c, t in CAPTIONS.items())
    )  # fmt: skip
    home = ["--home", str(linmem_home)]
    assert cli.main(["ingest", str(captions), "--memory", "raw", *home, "--json"]) == 0
    capsys.readouterr()
    chat = Scripted()
    with OpenAIServer(chat=chat) as server:
        args = ["structure", "raw", "--model", f"openai:{server.url}#test-model", "--export",
                str(tmp_path / "graphs"), *home, "--json"]  # fmt: skip
        assert cli.main(args) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["into"] == "raw-structured" and result["written"] == 7
        assert result["sources"] == {"kitchen_00": {"clips": 3, "characters": 2}}
        # The target now holds lines: a second run must not mix old and new.
        assert cli.main(args) == 1
        assert "already has 7 items" in json.loads(capsys.readouterr().out)["error"]["message"]
    assert len(chat.calls) == 3
    lines = open_memory("raw-structured", home=linmem_home).items()
    assert {f"CLIP_{c}": [i.text for i in lines if i.clip == c] for c in range(3)} == EXPECTED_JSON
    assert {(i.clip, i.time) for i in lines} == {(0, "00:00-00:20"), (1, "00:20-00:40"), (2, "00:40-01:00")}
    exported = load_graph(tmp_path / "graphs" / "kitchen_00.json")
    assert render_json(exported) == json.dumps(EXPECTED_JSON)
    cached = load_graph(linmem_home / "raw" / "cache" / "structured" / "kitchen_00.json")
    assert render_json(cached) == render_json(exported)
    assert answered_by_both_readers(linmem_home)

    # A run that fails leaves no empty target memory behind.
    from linmem.memory import memories

    tiny = [
        "structure",
        "raw",
        "--model",
        "tiny:qwen3.5",
        "--into",
        "never",
        "--retries",
        "0",
        *home,
        "--json",
    ]
    assert cli.main(tiny) == 1
    assert "structured extraction failed" in json.loads(capsys.readouterr().out)["error"]["message"]
    assert "never" not in memories(linmem_home)


def answered_by_both_readers(home: Path) -> bool:
    from linmem.memory import open_memory

    memory = open_memory("raw-structured", home=home)
    hit = memory.rank("where is the red mug", k=1, backend="embedding", embedder="hash:256")
    read = memory.ask("where is the red mug", model="tiny:qwen3.5", max_new_tokens=4)
    return hit.clips == (0,) and read.tokens.memory is not None and read.tokens.memory > 0
