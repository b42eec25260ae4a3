"""Every prompt text linmem sends to a model, in one place.

The LM reader's prompts share one system message and one memory intro, so a single state snapshot
(or server prefix-cache entry) serves reads, rankings and windowed reads alike; what differs goes
after the memory, in the query part.
"""

from __future__ import annotations

from collections.abc import Sequence

from .engines.base import Prompt

MEMORY_SYSTEM = (
    "You are the long-term memory of an AI agent. You are given the agent's memory: a chronological "
    "log of video clips, conversation sessions and notes. Each block starts with a tag such as "
    "[CLIP 12 | 06:00-06:30]. Answer using only what the memory says. Be concise and specific "
    "(names, objects, places, times), and cite the clips you used as CLIP <id>."
)

MEMORY_INTRO = "Memory:\n"

READ_QUERY = (
    "\nQuestion: {query}\n"
    "Answer from the memory in a few sentences, citing clips as CLIP <id>. "
    "If the memory does not contain the answer, say so."
)

RANK_QUERY = (
    "\nQuery: {query}\n"
    "Which clips are most relevant to the query? List up to {k} clip ids, most relevant first, "
    "in the form: CLIP <id>, CLIP <id>, ... Output only the list."
)

COMBINE_INTRO = (
    "The memory was too long to read at once, so it was read in windows. "
    "Here is what each window said about the question:\n"
)


def read_prompt(memory: Sequence[str], query: str) -> Prompt:
    return Prompt(MEMORY_SYSTEM, MEMORY_INTRO, memory, READ_QUERY.format(query=query.strip()))


def rank_prompt(memory: Sequence[str], query: str, k: int) -> Prompt:
    return Prompt(MEMORY_SYSTEM, MEMORY_INTRO, memory, RANK_QUERY.format(query=query.strip(), k=k))


def combine_prompt(window_answers: Sequence[tuple[str, str]], query: str) -> Prompt:
    """The final step of a windowed read: the windows' answers (labelled by the clips each
    window covered) take the place of the memory."""
    parts = [
        f"[WINDOW {i + 1} | {label}]\n{answer.strip()}\n\n"
        for i, (label, answer) in enumerate(window_answers)
    ]
    return Prompt(MEMORY_SYSTEM, COMBINE_INTRO, parts, READ_QUERY.format(query=query.strip()))
