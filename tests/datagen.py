"""Small data files in the publishers' formats (LoCoMo, M3-Bench), generated for tests: the
generators `linmem eval --offline` makes its stand-in data with, and a household memory."""

from __future__ import annotations

from linmem.evals.standin import ROBOT_CLIPS, STRUCTURED_CLIPS, graphs, locomo, m3bench, structured

# A five-clip household memory: clip 1 answers "where is the red mug?".
KITCHEN_CLIPS = [
    "Lily walks into the kitchen and makes coffee.",
    "Lily puts the red mug on the shelf above the sink.",
    "Tom reads a newspaper in the living room.",
    "Tom tells Lily that he works as a marketing manager.",
    "The cat sleeps on the sofa next to the red blanket.",
]

__all__ = ["KITCHEN_CLIPS", "ROBOT_CLIPS", "STRUCTURED_CLIPS", "graphs", "locomo", "m3bench", "structured"]
