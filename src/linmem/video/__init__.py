"""From video to memory: clips cut with ffmpeg, captioned by a vision-language model, written as items."""

from .captioners import Captioner, Transcriber, load_captioner, load_transcriber
from .ingest import Sampling, SourceReport, ingest

__all__ = [
    "Captioner",
    "Sampling",
    "SourceReport",
    "Transcriber",
    "ingest",
    "load_captioner",
    "load_transcriber",
]
