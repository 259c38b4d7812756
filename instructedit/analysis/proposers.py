"""Proposer LLMs for instruction construction: a small protocol, an OpenAI-compatible client, a local HF chat model,
and the robust parsing of their answers into candidate descriptions."""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from instructedit.config import DEFAULT_MODEL
from instructedit.tasks.instructions import LABEL, TOPIC

logger = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
PLACEHOLDER_TASKS = {"convsent": (LABEL, TOPIC)}  # descriptions of these tasks must contain these slots
MAX_CHARS = 300
MIN_WORDS = 3


class ProposerError(RuntimeError):
    """The proposer could not produce an answer (endpoint unreachable, HTTP error, malformed reply)."""


@runtime_checkable
class Proposer(Protocol):
    """Anything that answers a chat conversation with text; ``n`` is how many candidates are asked for."""

    name: str

    def complete(self, messages: Sequence[Message], n: int) -> str:
        ...


# --- OpenAI-compatible endpoint -------------------------------------------------------------------------


class OpenAIProposer:
    """POST ``{base_url}/chat/completions`` with the standard JSON body; one request per call, no retries."""

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 temperature: float = 0.9, max_tokens: int = 800, timeout: float = 60.0, seed: int | None = 0) -> None:
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.model = model or os.environ.get("OPENAI_MODEL") or DEFAULT_OPENAI_MODEL
        self.temperature, self.max_tokens, self.timeout, self.seed = temperature, max_tokens, timeout, seed
        self.name = f"openai:{self.model}"
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"proposer base URL {self.base_url!r} must start with http:// or https:// (OPENAI_BASE_URL / --base-url)")
        if not self.api_key and self.base_url == DEFAULT_OPENAI_BASE_URL:
            raise ValueError("the OpenAI proposer needs an API key: set OPENAI_API_KEY or pass --api-key "
                             "(or point OPENAI_BASE_URL / --base-url at a local OpenAI-compatible server)")

    def complete(self, messages: Sequence[Message], n: int) -> str:
        url = f"{self.base_url}/chat/completions"
        body: dict[str, Any] = {"model": self.model, "messages": list(messages), "temperature": self.temperature,
                                "max_tokens": self.max_tokens}
        if self.seed is not None:
            body["seed"] = self.seed
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            detail = err.read()[:500].decode(errors="replace")
            raise ProposerError(f"proposer endpoint {url} answered HTTP {err.code} {err.reason}: {detail}") from None
        except urllib.error.URLError as err:
            raise ProposerError(f"cannot reach the proposer endpoint {url}: {err.reason} (check OPENAI_BASE_URL / --base-url)") from None
        except TimeoutError:
            raise ProposerError(f"proposer endpoint {url} did not answer within {self.timeout:g} s (--timeout)") from None
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ProposerError(f"proposer endpoint {url} returned no choices[0].message.content: {raw[:300]!r}") from None
        if not isinstance(content, str):
            raise ProposerError(f"proposer endpoint {url} returned a non-text message content: {content!r}")
        return content


# --- local Hugging Face model -----------------------------------------------------------------------------


class LocalProposer:
    """A local causal LM: the chat template if the tokenizer has one, else a plain-text prompt that opens a numbered list.

    Sampling is seeded per call (``seed + call number``) inside a forked RNG, so runs repeat and the
    caller's random state is untouched.
    """

    def __init__(self, model: Any = None, tokenizer: Any = None, model_name: str = DEFAULT_MODEL, device: str = "cpu",
                 temperature: float = 0.9, top_p: float = 0.95, max_new_tokens: int = 256, seed: int = 0) -> None:
        if model is None:
            from instructedit.models.loading import load_model

            model, tokenizer = load_model(model_name, device=device)
        self.model, self.tokenizer = model, tokenizer
        self.name = f"local:{model_name}"
        self.temperature, self.top_p, self.max_new_tokens, self.seed = temperature, top_p, max_new_tokens, seed
        self.calls = 0

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_text(self, messages: Sequence[Message]) -> tuple[str, str]:
        """(text fed to the model, prefix to put back before the generated text)."""
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True), ""
        body = "\n\n".join(m["content"] for m in messages)
        return f"{body}\n\n1.", "1."

    @torch.no_grad()
    def complete(self, messages: Sequence[Message], n: int) -> str:
        text, prefix = self.prompt_text(messages)
        ids = self.tokenizer(text, add_special_tokens=not self.has_chat_template, return_tensors="pt").input_ids
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and ids.shape[1] + self.max_new_tokens > limit:
            keep = max(1, limit - self.max_new_tokens)
            logger.warning("proposer prompt of %d tokens cut to its last %d (model context %d)", ids.shape[1], keep, limit)
            ids = ids[:, -keep:]
        device = next(self.model.parameters()).device
        ids = ids.to(device)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + self.calls)
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=self.temperature, top_p=self.top_p,
                max_new_tokens=self.max_new_tokens, num_return_sequences=max(1, n), pad_token_id=self.tokenizer.pad_token_id,
            )
        self.calls += 1
        samples = [prefix + self.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]
        return "\n".join(samples)


PROPOSERS: dict[str, Callable[..., Proposer]] = {"openai": OpenAIProposer, "local": LocalProposer}


def make_proposer(name: str, **options: Any) -> Proposer:
    """Build the proposer registered as ``name`` (options go to its constructor)."""
    if name not in PROPOSERS:
        raise ValueError(f"unknown proposer {name!r}; valid proposers: {sorted(PROPOSERS)}")
    return PROPOSERS[name](**options)


# --- parsing candidates -------------------------------------------------------------------------------------

_MARKER = re.compile(r"^\s*(?:\(?\d{1,3}\s*[.):\]]|[-*•·–]|#{1,6})\s*")
_LABEL_PREFIX = re.compile(r"^(?:description|instruction|candidate)(?:\s*\d+)?\s*[:\-–]\s*", re.IGNORECASE)
_QUOTES = "\"'`“”‘’«»"
# A short name before the description: '"relabeling" - Rewrite ...' (quoted) or 'Precise edit: Replace ...' (colon).
_NAMED = (re.compile(r"""^["“‘'](?P<name>[^"”’']{1,40})["”’']\s*[:\-–—]\s+(?P<rest>.+)$"""),
          re.compile(r"^(?P<name>[^:]{1,40}):\s+(?P<rest>.+)$"))


def _clean(line: str) -> str:
    text = _MARKER.sub("", line, count=1).strip()
    text = text.replace("**", "").replace("__", "").strip()
    text = _LABEL_PREFIX.sub("", text).strip()
    for pattern in _NAMED:
        named = pattern.match(text)
        if named and len(named["name"].split()) <= 4 and len(named["rest"].split()) >= MIN_WORDS:
            text = named["rest"].strip()
            break
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    text = text.strip(_QUOTES).strip()
    for slot in (LABEL, TOPIC):  # "[label]" / "[ Topic ]" -> the exact slot the pool fills in
        text = re.sub(rf"\[\s*{re.escape(slot[1:-1])}\s*\]", slot, text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text)


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9\[\]]+", " ", text.lower()).strip()


def parse_candidates(text: str, task: str, exclude: Iterable[str] = (), max_chars: int = MAX_CHARS,
                     min_words: int = MIN_WORDS) -> tuple[list[str], list[dict[str, str]]]:
    """Candidate descriptions from a proposer's answer, and the rejected lines with reasons.

    Numbered or bulleted lines are taken when there are any (preamble and closing remarks are
    dropped), else every non-empty line; markers, ``Description:`` labels, markdown bold and quotes
    are stripped. Rejected: empty, too long, too short, a heading ending in ':', a duplicate (of this
    answer or of ``exclude``), and for ConvSent a line without both [LABEL] and [TOPIC] (other tasks
    may not use them).
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    marked = [line for line in lines if _MARKER.match(line) and _MARKER.sub("", line, count=1).strip()]
    chosen = marked if marked else lines
    seen_keys = {_key(e) for e in exclude}
    accepted: list[str] = []
    rejected: list[dict[str, str]] = []
    required = PLACEHOLDER_TASKS.get(task, ())
    for line in chosen:
        candidate = _clean(line)
        reason = None
        if not candidate:
            reason = "empty"
        elif len(candidate) > max_chars:
            reason = f"longer than {max_chars} characters"
        elif len(candidate.split()) < min_words:
            reason = f"fewer than {min_words} words"
        elif candidate.endswith(":"):
            reason = "a heading, not a description"
        elif required and not all(slot in candidate for slot in required):
            reason = f"a {task} description must contain {' and '.join(required)}"
        elif not required and any(slot in candidate for slot in (LABEL, TOPIC)):
            reason = f"{LABEL}/{TOPIC} are only filled in for {sorted(PLACEHOLDER_TASKS)}"
        elif _key(candidate) in seen_keys:
            reason = "duplicate"
        if reason is None:
            accepted.append(candidate)
            seen_keys.add(_key(candidate))
        else:
            rejected.append({"line": line[:400], "reason": reason})
    return accepted, rejected
