"""LoCoMo: QA over long two-speaker conversations, one memory per conversation.

The file is the published list of conversations (``locomo10.json``). Each conversation
(``sample_id``) is a source; session N is clip N (numbered as in the data, from 1, so evidence
``"D3:5"`` is clip 3), sessions in numeric order; each turn is one item ``"Speaker: text"``,
timed with its session's ``date_time`` string. Image turns append their BLIP caption.

QA categories: 1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial (no
``answer``; the right reply is that the conversation does not say).
"""

from __future__ import annotations

import re
from typing import Any

from ...errors import BadInput
from ...types import Item
from . import read_json
from .base import Example, Task

MODES = ("qa", "retrieval")
CATEGORIES = (1, 2, 3, 4, 5)
ADVERSARIAL = 5
NOT_MENTIONED = "Not mentioned in the conversation."

_SESSION_RE = re.compile(r"session_(\d+)")
_DIA_RE = re.compile(r"D(\d+):(\d+)")
_EVIDENCE_SPLIT_RE = re.compile(r"[;,\s]+")


class LoCoMoTask(Task):
    """LoCoMo QA: kind "qa", or "retrieval" (only QA with evidence, scored on `gold_clips`).

    Example ids are ``"<sample_id>:<index in the conversation's qa list>"``, stable under
    filtering. `categories` keeps only those LoCoMo categories, `conversations` only those
    sample ids, and `per_category` the first N questions of each category in each conversation
    (a subset that keeps every category, in the file's order).
    """

    name = "locomo"

    def __init__(
        self,
        path: str,
        mode: str = "qa",
        categories: list[int] | None = None,
        conversations: list[str] | None = None,
        per_category: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise BadInput(f"unknown LoCoMo mode {mode!r}: expected one of {', '.join(MODES)}")
        if categories is not None and (
            not isinstance(categories, list | tuple) or any(c not in CATEGORIES for c in categories)
        ):
            raise BadInput(f"LoCoMo categories must be a list of 1-5, found {categories!r}")
        if conversations is not None and (
            not isinstance(conversations, list | tuple) or not all(isinstance(c, str) for c in conversations)
        ):
            raise BadInput(f"LoCoMo conversations must be a list of sample ids, found {conversations!r}")
        if per_category is not None and (
            isinstance(per_category, bool) or not isinstance(per_category, int) or per_category < 1
        ):
            raise BadInput(f"LoCoMo per_category must be a positive integer, found {per_category!r}")
        self.path = path
        self.mode = mode
        self.categories = tuple(categories) if categories is not None else CATEGORIES
        data = read_json(path)
        if not isinstance(data, list):
            raise BadInput(f"{path}: expected a list of conversations, found {type(data).__name__}")
        self._items: dict[str, list[Item]] = {}
        for number, sample in enumerate(data):
            sample_id = self._add_conversation(number, sample)
            if conversations is None or sample_id in conversations:
                self._examples += _first_per_category(
                    self._qa_examples(sample_id, sample["qa"]), per_category
                )
        missing = sorted(set(conversations or ()) - set(self._items))
        if missing:
            raise BadInput(f"{path}: no conversation {missing[0]!r} (it has {', '.join(self._items)})")

    def items(self, source: str) -> list[Item]:
        if source not in self._items:
            raise BadInput(f"unknown LoCoMo conversation {source!r}: not in {self.path}")
        return list(self._items[source])

    def _add_conversation(self, number: int, sample: Any) -> str:
        where = f"{self.path}: conversation #{number}"
        if not isinstance(sample, dict):
            raise BadInput(f"{where}: expected an object, found {type(sample).__name__}")
        for name in ("sample_id", "conversation", "qa"):
            if name not in sample:
                raise BadInput(f"{where}: missing field {name!r}")
        sample_id = str(sample["sample_id"])
        if sample_id in self._items:
            raise BadInput(f"{where}: duplicate sample_id {sample_id!r}")
        if not isinstance(sample["conversation"], dict) or not isinstance(sample["qa"], list):
            raise BadInput(f"{where} ({sample_id}): 'conversation' must be an object and 'qa' a list")
        self._items[sample_id] = self._turns(sample_id, sample["conversation"])
        return sample_id

    def _turns(self, sample_id: str, conversation: dict[str, Any]) -> list[Item]:
        sessions = sorted(
            (int(m.group(1)), turns)
            for key, turns in conversation.items()
            if (m := _SESSION_RE.fullmatch(key)) and isinstance(turns, list)
        )
        items = []
        for session, turns in sessions:
            date_time = conversation.get(f"session_{session}_date_time")
            for index, turn in enumerate(turns):
                where = f"{self.path}: {sample_id} session {session} turn #{index}"
                items.append(_turn_item(turn, session, date_time, sample_id, where))
        return items

    def _qa_examples(self, sample_id: str, qas: list[Any]) -> list[Example]:
        sessions = {i.clip for i in self._items[sample_id]}
        examples = []
        for index, qa in enumerate(qas):
            where = f"{self.path}: {sample_id} qa #{index}"
            if not isinstance(qa, dict):
                raise BadInput(f"{where}: expected an object, found {type(qa).__name__}")
            for name in ("question", "category"):
                if name not in qa:
                    raise BadInput(f"{where}: missing field {name!r}")
            category = qa["category"]
            if category not in CATEGORIES:
                raise BadInput(f"{where}: field 'category' must be one of 1-5, found {category!r}")
            if category not in self.categories:
                continue
            if "answer" not in qa and category != ADVERSARIAL:
                raise BadInput(f"{where}: missing field 'answer'")
            evidence = qa.get("evidence") or []
            evidence = [evidence] if isinstance(evidence, str) else list(evidence)
            gold, bad = evidence_sessions(evidence, sessions)
            if self.mode == "retrieval" and not gold:
                continue
            meta: dict[str, Any] = {"category": category, "evidence": evidence, "bad_evidence": bad}
            if "adversarial_answer" in qa:
                meta["adversarial_answer"] = qa["adversarial_answer"]
            examples.append(
                Example(
                    id=f"{sample_id}:{index}",
                    kind="retrieval" if self.mode == "retrieval" else "qa",
                    question=str(qa["question"]),
                    source=sample_id,
                    answer=str(qa["answer"]) if "answer" in qa else NOT_MENTIONED,
                    gold_clips=gold,
                    types=(f"category {category}",),
                    meta=meta,
                )
            )
        return examples


def _first_per_category(examples: list[Example], n: int | None) -> list[Example]:
    if n is None:
        return examples
    seen: dict[int, int] = {}
    kept = []
    for e in examples:
        category = e.meta["category"]
        if seen.get(category, 0) < n:
            seen[category] = seen.get(category, 0) + 1
            kept.append(e)
    return kept


def evidence_sessions(evidence: list[Any], sessions: set[int | None]) -> tuple[tuple[int, ...], int]:
    """Sorted session numbers of LoCoMo evidence ids (``"D3:5"``) and how many ids were malformed.

    An entry may hold several ids (``"D8:6; D9:17"``); an id that does not parse or names a
    session the conversation lacks counts as malformed and is skipped.
    """
    found: set[int] = set()
    bad = 0
    for entry in evidence:
        for token in _EVIDENCE_SPLIT_RE.split(str(entry).strip()):
            m = _DIA_RE.fullmatch(token)
            if m and int(m.group(1)) in sessions:
                found.add(int(m.group(1)))
            elif token:
                bad += 1
    return tuple(sorted(found)), bad


def _turn_item(turn: Any, session: int, date_time: Any, sample_id: str, where: str) -> Item:
    if not isinstance(turn, dict):
        raise BadInput(f"{where}: expected an object, found {type(turn).__name__}")
    for name in ("speaker", "text"):
        if name not in turn:
            raise BadInput(f"{where}: missing field {name!r}")
    text = f"{turn['speaker']}: {turn['text']}"
    if turn.get("blip_caption"):
        text += f" [shares a photo: {turn['blip_caption']}]"
    return Item(
        text=text,
        clip=session,
        time=str(date_time) if date_time else None,
        source=sample_id,
        meta={"dia_id": turn.get("dia_id"), "speaker": turn["speaker"]},
    )
