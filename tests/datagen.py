"""Small data files in the publishers' formats (LoCoMo, M3-Bench), generated for tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

# A five-clip household memory: clip 1 answers "where is the red mug?".
KITCHEN_CLIPS = [
    "Lily walks into the kitchen and makes coffee.",
    "Lily puts the red mug on the shelf above the sink.",
    "Tom reads a newspaper in the living room.",
    "Tom tells Lily that he works as a marketing manager.",
    "The cat sleeps on the sofa next to the red blanket.",
]
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


def locomo(path: Path, conversations: int = 3, sessions: int = 6, seed: int = 0) -> Path:
    """A LoCoMo-format file: sessions of turns, and QA whose evidence points at one turn each."""
    rng = random.Random(seed)
    data = []
    for c in range(conversations):
        a, b = PEOPLE[c % len(PEOPLE)]
        conv: dict = {"speaker_a": a, "speaker_b": b}
        qa = []
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
    path.write_text(json.dumps(data))
    return path


ROBOT_CLIPS = [
    "Alice puts the red mug in the left cupboard of the kitchen.",
    "Bob waters the fern by the living room window.",
    "Alice tells Bob that her sister Clara visits on Saturday.",
    "Bob puts his car keys in the top drawer of the hallway cabinet.",
    "Alice cooks spaghetti with garlic and cherry tomatoes.",
    "The cat sleeps on the armchair next to the bookshelf.",
]


def m3bench(folder: Path, videos: int = 2, clips: int = 6, web: bool = False) -> tuple[Path, Path]:
    """A robot-format (or web-format) annotation file and a captions folder (`<video>.jsonl`)."""
    captions = folder / "captions"
    captions.mkdir(parents=True, exist_ok=True)
    annotations: dict = {}
    for v in range(videos):
        vid = f"kitchen_{v:02d}"
        lines = [
            {
                "clip": i,
                "start": 30 * i,
                "end": 30 * i + 30,
                "caption": f"{ROBOT_CLIPS[i % 6]} (video {v}, part {i})",
            }
            for i in range(clips)
        ]
        (captions / f"{vid}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        qa = [
            ("Where is the red mug?", "In the left cupboard.", 1, ["Multi-Detail Reasoning"]),
            ("Who visits on Saturday?", "Clara, Alice's sister.", 3, ["Human Understanding"]),
            (
                "Where are Bob's keys?",
                "In the top drawer of the hallway cabinet.",
                5,
                ["Cross-Modal Reasoning"],
            ),
        ]
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
                for i, (q, a, before, t) in enumerate(qa)
            ],
        }
    if web:
        for vid, entry in annotations.items():
            entry["video_url"] = f"https://www.youtube.com/watch?v={vid}"
            for qa in entry["qa_list"]:
                del qa["timestamp"], qa["before_clip"]
    path = folder / ("web.json" if web else "robot.json")
    path.write_text(json.dumps(annotations))
    return path, captions


STRUCTURED_CLIPS = [
    (["<person_1> puts the red mug in the left cupboard."], ["<person_1> keeps mugs in the left cupboard."]),
    (["<person_2> waters the fern by the window."], ["<person_2> looks after the plants."]),
    (["<face_3> tells <person_2> that Clara visits on Saturday."], ["Equivalence: <face_3>, <person_1>"]),
]


def structured(folder: Path, videos: int = 2, clips: int = 6) -> Path:
    """Structured memory graphs (`linmem.structured`) of the videos `m3bench` generates."""
    from linmem.structured import Extraction, build_graph, parse_extraction, save_graph

    folder.mkdir(parents=True, exist_ok=True)
    for v in range(videos):
        vid = f"kitchen_{v:02d}"
        extractions: list[tuple[int, Extraction]] = []
        for i in range(clips):
            episodic, semantic = STRUCTURED_CLIPS[i % len(STRUCTURED_CLIPS)]
            answer = {"episodic": [f"{e} (video {v}, part {i})" for e in episodic], "semantic": semantic}
            extractions.append((i, parse_extraction(json.dumps(answer))))
        save_graph(build_graph(vid, "datagen", extractions), folder / f"{vid}.json")
    return folder
