"""The reasoning controller: a chat model that searches a memory reader until it can answer.

Policy ``"m3"`` is M3-Agent's loop (ByteDance-Seed/m3-agent, ``m3_agent/control.py``), kept as it
is so that only the memory backend changes between runs:

- the system message states the question; the first user message is ``Searched knowledge: {}``;
- before every generation the format instruction is appended to the last user message (and stays
  in the dialogue), and in the last round also the suffix that demands an answer;
- the controller replies ``Action: [Search]`` or ``Action: [Answer]`` then ``Content: ...``. An
  answer ends the dialogue; anything else is a search, and a reply that follows neither format is
  an empty search (nothing is read; the result is empty), as in M3-Agent;
- a search's result comes back as the next user message, ``Searched knowledge: <result>``, with
  M3-Agent's note appended when the result is empty. The LM reader's result is its natural-language
  answer; the embedding reader's is its clips as M3-Agent formats them,
  ``{"CLIP_12": [lines...], ...}`` in clip order, never repeating a clip already shown in the
  dialogue (the next best unseen clips are returned instead);
- a controller that has not answered after `rounds` replies gives no answer (``None``).

Differences from control.py: replies are parsed tolerantly (any case, markdown, missing brackets
or labels) where control.py uses one strict regex; its ``"character id"`` line-wise search is not
reproduced; a search asked for in the last round is not run, since nothing would read it; a reply
ends at the end of its ``Content:`` line (`reply_done`) and after at most 256 tokens, where
control.py let a reasoning model write 1,024; a local controller continues each round from the
state the last one left (`linmem.engines.session`), which changes the work, not the replies.

Policy ``"single-shot"`` is the no-loop baseline: one search with the question itself, then one
controller reply, with the same prompts and the last-round suffix, that must answer. Without a
controller the reader's own answer text is the answer (for the embedding reader, the lines of the
clips it found).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from . import progress, prompts
from .engines import load_engine
from .errors import BadInput
from .readers.base import Reader
from .readers.embedding import EmbeddingReader
from .types import Hit, Tokens, Turn

POLICIES = ("m3", "single-shot")
CONTROLLER_MAX_TOKENS = prompts.CONTROLLER_MAX_TOKENS

# A labelled action: "Action: [Answer]", "**Action:** search", "ACTION - [Search]", "action:[answer]".
_ACTION = re.compile(r"\baction\b[\s*_`]*(?:[:：-][\s*_`]*\[?|\[)\s*([A-Za-z]+)", re.IGNORECASE)
# An unlabelled one: "[Answer] ...", "[SEARCH] ...".
_BRACKETED = re.compile(r"\[\s*(answer|search)\s*\]", re.IGNORECASE)
_CONTENT = re.compile(r"\bcontent\b[\s*_`]*[:：][\s*_`]*", re.IGNORECASE)
_THINK_END = re.compile(r"</think>", re.IGNORECASE)


def reply_done(reply: str) -> bool:
    """Whether a reply so far already holds all `parse_action` will read: an action, then a
    ``Content:`` label with text, ended by a newline. The controller stops there instead of
    running on to its token limit (a 1.5B model often restates the format or keeps talking)."""
    if reply.lstrip().startswith("<think>") and not _THINK_END.search(reply):
        return False  # still reasoning: what looks like an action may be a draft
    text = _THINK_END.split(reply)[-1]
    found = _ACTION.search(text) or _BRACKETED.search(text)
    if found is None:
        return False
    label = _CONTENT.search(text, found.end())
    if label is None:
        return False
    line, newline, _ = text[label.end() :].partition("\n")
    return bool(newline) and bool(line.strip().strip("*`").strip())


def parse_action(reply: str) -> tuple[str, str | None]:
    """The controller's action and its content: ``("answer", text)``, ``("search", query)`` (query
    None when it gave none) or ``("invalid", None)`` for a reply with no action.

    Only the text after the last ``</think>`` counts. The first action label decides: "Answer" is an
    answer, any other word a search (as in control.py). The content is what follows the last
    ``Content:`` label, or, without one, what follows the action. An answer without content is
    invalid, as control.py's regex, which needs ``Content:``, would have it.
    """
    text = _THINK_END.split(reply)[-1]
    found = _ACTION.search(text) or _BRACKETED.search(text)
    if found is None:
        return "invalid", None
    action = "answer" if found.group(1).lower() == "answer" else "search"
    labels = [m for m in _CONTENT.finditer(text, found.end())]
    rest = text[labels[-1].end() :] if labels else text[found.end() :].lstrip(" \t]:：-")
    content = rest.strip().strip("*`").strip()
    if action == "answer" and not content:
        return "invalid", None
    return action, content or None


@dataclass(frozen=True, slots=True)
class Trace:
    """One question's run: the answer (None: the controller never answered), the dialogue, and its
    costs.

    `rounds` counts controller replies and `searches` the reads of the memory: a reply with no
    query (malformed, or an empty Content line) gets M3-Agent's empty result and reads nothing.
    `reader` names the reader the controller searches. `controller_tokens` and `reader_tokens` sum
    the turns' tokens (the controller's prompt tokens are `processed + cached`, its completion
    tokens `generated`); `controller_s` and `reader_s` sum the turns' seconds, and `total_s` is the
    whole run.
    """

    question: str
    answer: str | None
    policy: str
    rounds: int
    searches: int
    turns: tuple[Turn, ...]
    controller: str | None
    reader: str | None
    controller_tokens: Tokens
    reader_tokens: Tokens
    total_s: float
    controller_s: float
    reader_s: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["turns"] = [t.to_dict() for t in self.turns]
        return d


class Agent:
    """Answers questions over a memory `reader` with a `controller` model (an engine spec such as
    ``openai:URL#MODEL``, ``hf:PATH`` or ``tiny:qwen3``); see the module docstring for the policies.

    `rounds` bounds the controller's replies; `max_new_tokens`, `temperature` and `seed` go to each
    of its generations (M3-Agent sampled at temperature 0.6; the default here is greedy). A reply
    ends at the end of its ``Content:`` line (`reply_done`), or after `max_new_tokens`.

    With a local controller, each question's dialogue is one `ChatSession` (`reuse_state`): round
    k runs only the tokens round k-1 added, and the replies are those of a controller that re-reads
    the whole dialogue every round (`reuse_state=False`, the reference).
    """

    def __init__(
        self,
        reader: Reader,
        *,
        controller: str | None = None,
        policy: str = "m3",
        rounds: int = 5,
        max_new_tokens: int = CONTROLLER_MAX_TOKENS,
        temperature: float = 0.0,
        seed: int = 0,
        reuse_state: bool = True,
    ) -> None:
        check_settings(policy, controller, rounds)
        if max_new_tokens < 1 or temperature < 0:
            raise BadInput("max_new_tokens must be positive and temperature at least 0")
        self.reader = reader
        self.engine = load_engine(controller) if controller is not None else None
        self.policy = policy
        self.rounds = rounds
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.reuse_state = reuse_state

    def run(self, question: str) -> Trace:
        if not isinstance(question, str) or not question.strip():
            raise BadInput(f"question must be a non-empty string, found {question!r}")
        start = time.perf_counter()
        dialogue = _Dialogue(question)
        if self.engine is not None:
            session = self.reuse_state and hasattr(self.engine, "chat_session")
            dialogue.chat = self.engine.chat_session().chat if session else self.engine.chat
        if self.policy == "m3":
            answer = self._m3(dialogue)
        else:
            answer = self._single_shot(dialogue)
        return dialogue.trace(answer, self, time.perf_counter() - start)

    def _m3(self, d: _Dialogue) -> str | None:
        d.turns += [Turn("system", prompts.m3_system(d.question)), Turn("user", prompts.M3_KNOWLEDGE + "{}")]
        with progress.task("agent", self.rounds, "round") as task:
            for r in range(self.rounds):
                last_round = r == self.rounds - 1
                action, content = self._reply(d, last_round)
                if action == "answer":
                    return content
                task.step(note=f"searched {content!r}" if content else f"reply {r + 1}: {action}")
                if not last_round:
                    self._search(d, content)
        return None

    def _single_shot(self, d: _Dialogue) -> str | None:
        if self.engine is None:
            self._search(d, d.question)
            return d.turns[-1].answer
        d.turns.append(Turn("system", prompts.m3_system(d.question)))
        self._search(d, d.question)
        action, content = self._reply(d, last_round=True)
        return content if action == "answer" else None

    def _reply(self, d: _Dialogue, last_round: bool) -> tuple[str, str | None]:
        """Append the instruction (and the last-round suffix) to the last user turn, then ask."""
        assert self.engine is not None
        suffix = prompts.M3_INSTRUCTION + (prompts.M3_LAST_ROUND if last_round else "")
        d.turns[-1] = replace(d.turns[-1], content=d.turns[-1].content + suffix)
        t0 = time.perf_counter()
        gen = d.chat(
            [t.message() for t in d.turns],
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            seed=self.seed,
            until=reply_done,
        )
        seconds = time.perf_counter() - t0
        action, content = parse_action(gen.text)
        tokens = Tokens(None, gen.processed, gen.cached, gen.generated)
        d.turns.append(Turn("assistant", gen.text, action=action, tokens=tokens, seconds=seconds))
        return action, content

    def _search(self, d: _Dialogue, query: str | None) -> None:
        """Append the user turn that answers a search; an empty query reads nothing."""
        if not query or not query.strip():
            d.add_search(Turn("user", prompts.M3_KNOWLEDGE + "{}" + prompts.M3_EMPTY_RESULT))
            return
        t0 = time.perf_counter()
        if isinstance(self.reader, EmbeddingReader):
            answer = self.reader.read(query, exclude_clips=d.shown)
            result = m3_clips_json(answer.hits)
            empty = not answer.hits
            d.shown.update(answer.clips)
        else:
            answer = self.reader.read(query)
            result = answer.text.strip()
            empty = not result
        seconds = time.perf_counter() - t0
        d.reader_model = d.reader_model or answer.model
        content = prompts.M3_KNOWLEDGE + result + (prompts.M3_EMPTY_RESULT if empty else "")
        d.add_search(
            Turn(
                "user",
                content,
                query=query,
                answer=answer.text,
                clips=answer.clips,
                tokens=answer.tokens,
                seconds=seconds,
            )
        )


def check_settings(policy: str, controller: str | None, rounds: int) -> None:
    """Refuse an unknown policy, the m3 policy without a controller, or rounds below 1."""
    if policy not in POLICIES:
        raise BadInput(f"unknown policy {policy!r}: expected one of {', '.join(POLICIES)}")
    if policy == "m3" and controller is None:
        raise BadInput("policy 'm3' needs a controller model spec (e.g. openai:URL#MODEL or hf:PATH)")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise BadInput(f"rounds must be a positive integer, found {rounds!r}")


def m3_clips_json(hits: tuple[Hit, ...]) -> str:
    """Clips as M3-Agent shows them to its controller: ``{"CLIP_<id>": [lines]}`` in clip order,
    then unclipped items as ``ITEM_<id>``."""
    clipped = sorted((h for h in hits if h.clip is not None), key=lambda h: h.clip or 0)
    loose = [h for h in hits if h.clip is None]
    shown = {f"CLIP_{h.clip}": list(h.lines) for h in clipped}
    shown.update({f"ITEM_{h.item_ids[0] if h.item_ids else i}": list(h.lines) for i, h in enumerate(loose)})
    return json.dumps(shown, ensure_ascii=False)


class _Dialogue:
    """The growing dialogue of one run: its turns, which of them answer searches, the clips shown."""

    def __init__(self, question: str) -> None:
        self.question = question
        self.turns: list[Turn] = []
        self.search_at: list[int] = []
        self.shown: set[int] = set()
        self.reader_model: str | None = None
        self.chat: Any = None  # the controller's chat: its engine's, or a session's

    def add_search(self, turn: Turn) -> None:
        self.search_at.append(len(self.turns))
        self.turns.append(turn)

    def trace(self, answer: str | None, agent: Agent, total_s: float) -> Trace:
        asked = [t for t in self.turns if t.role == "assistant"]
        searches = [self.turns[i] for i in self.search_at]
        read = [t for t in searches if t.query is not None]
        return Trace(
            question=self.question,
            answer=answer,
            policy=agent.policy,
            rounds=len(asked),
            searches=len(read),
            turns=tuple(self.turns),
            controller=agent.engine.id if agent.engine is not None else None,
            reader=self.reader_model or getattr(agent.reader, "model_id", None),
            controller_tokens=_total(t.tokens for t in asked),
            reader_tokens=_total(t.tokens for t in searches),
            total_s=total_s,
            controller_s=sum(t.seconds or 0.0 for t in asked),
            reader_s=sum(t.seconds or 0.0 for t in searches),
        )


def _total(tokens: Iterable[Tokens | None]) -> Tokens:
    memory: int | None = None
    processed = cached = generated = 0
    for t in tokens:
        if t is None:
            continue
        if t.memory is not None:
            memory = (memory or 0) + t.memory
        processed, cached, generated = processed + t.processed, cached + t.cached, generated + t.generated
    return Tokens(memory, processed, cached, generated)


__all__ = [
    "CONTROLLER_MAX_TOKENS",
    "POLICIES",
    "Agent",
    "Trace",
    "check_settings",
    "m3_clips_json",
    "parse_action",
    "reply_done",
]
