"""Small data files in the publishers' formats (LoCoMo, M3-Bench), generated for tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

PEOPLE = [("Caroline", "Melanie"), ("Jon", "Gina"), ("Ana", "Ben")]
TOPICS = [
    ("painting", "I painted a sunrise over the lake last weekend."),
    ("running", "I ran a half marathon in the rain on Sunday."),
    ("cooking", "I baked sourdough bread with rosemary yesterday."),
    ("travel", "We booked a trip to Lisbon for the spring."),
    ("garden", "My tomatoes finally turned red this week."),
    ("music", "I started piano lessons with a teacher downtown."),
    ("books", "I am reading a novel about a lighthouse keeper."),
    ("pets", "We adopted a grey kitten called Pixel."),
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
                topic, line = TOPICS[(c * sessions + s + t) % len(TOPICS)]
                text = f"{line} It was about {topic} for {speaker} in session {s} of chat {c}."
                turns.append({"speaker": speaker, "dia_id": f"D{s}:{t}", "text": text})
                if t == 1:
                    qa.append(
                        {
                            "question": f"What did {speaker} say about {topic} in session {s}?",
                            "answer": line.rstrip("."),
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
