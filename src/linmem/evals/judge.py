"""The LLM judge of M3-Bench answers: M3-Agent's evaluation, with any chat model as the judge.

M3-Agent (m3_agent/control.py, `eval_answer`) asks gpt-4o-2024-11-20, at temperature 0 with up to
2048 tokens, whether the ground truth can be inferred from the agent's answer, using the prompt
`prompt_agent_verify_answer_referencing` under the system message "You are an expert in video
understanding." (both verbatim in `linmem.prompts`); the answer is correct iff "yes" occurs in the
lower-cased reply. An empty answer is wrong without asking. The judge model is recorded with every
verdict, because accuracies are only comparable under the same judge.

One difference: control.py scores a judge that keeps failing as "incorrect"; here the error is
raised after `attempts` tries, so that an outage never passes for a wrong answer.

A local judge runs its prompts in a `ChatSession` that keeps the instructions every verdict
shares, and a verdict asked again (two systems giving the same answer) is not asked twice: the
judge is greedy, so both give the verdict a fresh call would.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from .. import prompts
from ..engines import load_engine
from ..errors import EngineError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The judge's decision, its reply verbatim ("" when no call was needed), and the judge model."""

    correct: bool
    raw: str
    model: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Judge:
    """Judges answers with the chat model `model` (an engine spec, e.g. ``openai:URL#gpt-4o``)."""

    def __init__(
        self, model: str, *, max_new_tokens: int = 2048, attempts: int = 3, backoff_s: float = 2.0
    ) -> None:
        self.engine = load_engine(model)
        self.model = str(self.engine.id)
        chat_session = getattr(self.engine, "chat_session", None)
        self._chat = chat_session(grows=False).chat if chat_session is not None else self.engine.chat
        self._verdicts: dict[tuple[str, str, str], Verdict] = {}
        self.max_new_tokens = max_new_tokens
        self.attempts = max(1, attempts)
        self.backoff_s = backoff_s

    def evaluate(self, question: str, gold: str, prediction: str | None) -> Verdict:
        """Is `prediction` a correct answer to `question`, given the ground truth `gold`?

        No answer (None) or a blank one is incorrect without a call.
        """
        if prediction is None or not prediction.strip():
            return Verdict(False, "", self.model)
        key = (question, gold, prediction)
        if key not in self._verdicts:
            self._verdicts[key] = self._ask(prompts.judge_messages(question, gold, prediction))
        return self._verdicts[key]

    def _ask(self, messages: list[dict[str, str]]) -> Verdict:
        for attempt in range(self.attempts):
            try:
                gen = self._chat(messages, max_new_tokens=self.max_new_tokens, temperature=0.0)
                break
            except EngineError as e:
                if attempt == self.attempts - 1:
                    raise
                log.warning("judge %s failed (%s); trying again", self.model, e)
                time.sleep(self.backoff_s * 2**attempt)
        return Verdict("yes" in gen.text.lower(), gen.text, self.model)


__all__ = ["Judge", "Verdict"]
