"""An optional LLM judge for the generation protocol: does the edited model's answer state the target? (yes / no).

The judge is any chat client with ``complete(messages, n) -> str`` (the proposers' protocol); the
``evaluate`` command gives it an OpenAI-compatible endpoint (``analysis.proposers.OpenAIProposer``,
configured from ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` / ``OPENAI_MODEL``). Exact match stays the
default metric; the judge adds ``gen_reliability_judge``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Protocol

from instructedit.evaluation.generation import normalize_answer

logger = logging.getLogger(__name__)

SYSTEM = "You grade short answers to questions. Reply with exactly one word: yes or no."
_VERDICT = re.compile(r"^\W*(yes|no)\b")


class ChatClient(Protocol):
    """What the judge needs from an endpoint client (``analysis.proposers.Proposer`` fits)."""

    name: str

    def complete(self, messages: Sequence[dict[str, str]], n: int) -> str:
        ...


def judge_messages(question: str, target: str, answer: str) -> list[dict[str, str]]:
    """The conversation that asks whether ``answer`` states ``target``."""
    user = (f"Question: {question}\nExpected answer: {target}\nModel answer: {answer}\n"
            "Does the model answer state the expected answer? Reply yes or no.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(reply: str) -> float | None:
    """1.0 for a reply that starts with yes, 0.0 for no, None otherwise."""
    found = _VERDICT.match(reply.strip().lower())
    return None if found is None else float(found[1] == "yes")


class LLMJudge:
    """Asks ``client`` one yes/no question per answer; an endpoint error or an unclear reply gives None (counted, logged)."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client
        self.name = f"judge:{client.name}"
        self.calls = 0
        self.failures = 0

    def verdict(self, question: str, target: str, answer: str) -> float | None:
        if not normalize_answer(answer):
            return 0.0  # an empty answer states nothing: no call needed
        self.calls += 1
        try:
            reply = self.client.complete(judge_messages(question, target, answer), 1)
        except (RuntimeError, OSError) as err:  # the endpoint client's error (ProposerError is a RuntimeError)
            self.failures += 1
            logger.warning("judge call failed (%s); the case gets no judge verdict", err)
            return None
        verdict = parse_verdict(reply)
        if verdict is None:
            self.failures += 1
            logger.warning("judge reply %r is neither yes nor no; the case gets no judge verdict", reply[:80])
        return verdict
