"""The demo web app of ``instructedit serve``: a local page to apply fact edits to one model, compare predictions, and roll edits back.

The edit logic (``EditSession``: validation, the stack of active edits, one lock around the model)
is plain Python; ``create_app`` wraps it in a FastAPI app. FastAPI and uvicorn are imported only
when the app is built, so the rest of the CLI works without the ``serve`` extra.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from instructedit.api import (
    REPHRASE_ALIAS, Edit, EditedModel, InstructEditor, answer, generate, max_input_length, rephrase_key, score_target, top_predictions,
)
from instructedit.editors.neighbours import Neighbours, names_subject
from instructedit.records import SENTIMENTS, TASKS
from instructedit.tasks.collate import encode_answer

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
# Hosts a browser may name when the server is bound to loopback; any other Host header (DNS rebinding) is refused.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
INSTALL_HINT = "`instructedit serve` needs the serve extra: pip install 'instructedit[serve]' (fastapi, uvicorn)"


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for; the page shows these."""

    max_prompt_chars: int = 500
    max_target_chars: int = 200
    max_subject_chars: int = 100
    max_active_edits: int = 20  # each active edit holds a copy of the weights it changed, to roll back exactly
    top_k: int = 5
    max_new_tokens: int = 20

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"ServeLimits.{name} must be >= 1, got {value}")


class InputError(ValueError):
    """A request field that cannot be used; ``field`` names it (the page shows ``str(err)``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFoundError(LookupError):
    """No active edit has the requested id."""


class TooManyEditsError(RuntimeError):
    """The stack of active edits is full."""


def _text(payload: Mapping[str, Any], field: str, max_chars: int, required: bool = True) -> str:
    value = payload.get(field, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InputError(field, f"must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer or reply can encode
        raise InputError(field, f"is not valid Unicode text (a lone surrogate {value[err.start]!r} at character {err.start})") from None
    value = value.strip()
    if required and not value:
        raise InputError(field, "must not be empty")
    if len(value) > max_chars:
        raise InputError(field, f"{len(value)} characters; at most {max_chars} are allowed")
    return value


PREDICT_FIELDS = ("prompt",)
EDIT_FIELDS = ("prompt", "target", "task", "subject", REPHRASE_ALIAS, "label", "rephrase")  # rephrase: as Edit and edit --file say


def _only(payload: Mapping[str, Any], fields: tuple[str, ...]) -> None:
    """A field the request does not read is an ``InputError`` naming it, not dropped in silence (a misspelt optional field
    would otherwise do nothing)."""
    unknown = sorted(k for k in payload if k not in fields)
    if unknown:
        raise InputError(str(unknown[0])[:40], f"not a field of this request; its fields are {', '.join(fields)}")


def parse_prompt(payload: Mapping[str, Any], limits: ServeLimits) -> str:
    """The ``prompt`` of a predict request, checked."""
    _only(payload, PREDICT_FIELDS)
    return _text(payload, "prompt", limits.max_prompt_chars)


def parse_edit(payload: Mapping[str, Any], limits: ServeLimits) -> Edit:
    """An ``Edit`` from a request body; raises ``InputError`` naming the first bad field."""
    _only(payload, EDIT_FIELDS)
    prompt = _text(payload, "prompt", limits.max_prompt_chars)
    target = _text(payload, "target", limits.max_target_chars)
    task = payload.get("task") or "counterfact"
    if task not in TASKS:
        raise InputError("task", f"unknown task {str(task)[:40]!r}; valid tasks: {', '.join(TASKS)}")
    subject = _text(payload, "subject", limits.max_subject_chars, required=False)
    try:
        key = rephrase_key(payload)
    except ValueError as err:
        raise InputError("rephrase", str(err)) from None
    paraphrase = _text(payload, key, limits.max_prompt_chars, required=False) if key else ""
    rephrase = (paraphrase,) if paraphrase else ()
    label = payload.get("label") or None
    if task == "convsent":
        if label not in SENTIMENTS:
            raise InputError("label", f"a convsent edit needs a label, one of: {', '.join(SENTIMENTS)}")
        if not subject:
            raise InputError("subject", "a convsent edit needs the subject its opinion is about")
        return Edit(prompt, target, task, subject=subject, label=label, rephrase=rephrase)
    if label is not None:
        raise InputError("label", f"a label belongs to convsent edits, not to task {task!r}")
    return Edit(prompt, target, task, subject=subject, rephrase=rephrase)


def is_loopback(host: str) -> bool:
    """True when binding ``host`` keeps the server reachable from this machine only."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public address


@dataclass
class ActiveEdit:
    """One edit in the model, with the handle that restores the weights it changed."""

    id: int
    edit: Edit
    handle: EditedModel
    top_before: str
    top_after: str

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "prompt": self.edit.prompt, "target": self.edit.target, "task": self.edit.task,
                "subject": self.edit.subject, "label": self.edit.label, "top_before": self.top_before, "top_after": self.top_after}


class EditSession:
    """One model, one editor and the stack of edits applied to the model, newest last.

    Edits are applied one after another (each computed on the model as the earlier ones left it,
    like ``apply_sequential``, in the editor's ``many_edit_forms``) and stay in the model. Rolling back edit ``i`` undoes it and every
    newer edit, newest first, so the weights return bit for bit to their state before ``i``. The
    handles are never ``keep()``-ed: they hold the original weights until rolled back.
    Every model or tokenizer access holds ``lock`` (the web app serves requests from a threadpool).

    ``neighbours`` (``serve --neighbours``; a least-squares editor with a subject pool, its own or the neighbours'): every
    edit holds its same-relation neighbours still (``InstructEditor.apply(neighbours=...)``, in twice the calibrated
    rounds), so other questions of its relation asked in its frame keep their answers; each edit must then name the
    subject its prompt names.
    """

    def __init__(self, editor: InstructEditor, model: nn.Module, tokenizer: PreTrainedTokenizerBase, limits: ServeLimits | None = None,
                 neighbours: Neighbours | None = None) -> None:
        self.editor, self.model, self.tokenizer = editor, model, tokenizer
        if neighbours is not None:
            editor.neighbour_pool(neighbours, "serve")  # no pool: refused before the server starts
        self.neighbours = neighbours
        self.limits = limits or ServeLimits()
        self.max_tokens = max_input_length(model)
        self.lock = threading.Lock()
        self._stack: list[ActiveEdit] = []
        self._ids = itertools.count(1)

    # -- checks that need the tokenizer (called with the lock held) ---------------------------------
    def _check_generation_fits(self, prompt: str) -> None:
        n = len(self.tokenizer(prompt)["input_ids"])
        if n + self.limits.max_new_tokens > self.max_tokens:
            raise InputError("prompt", f"{n} tokens; with the {self.limits.max_new_tokens}-token continuation this model "
                                       f"accepts at most {self.max_tokens - self.limits.max_new_tokens}")

    def _check_edit_fits(self, edit: Edit) -> None:
        if self.neighbours is not None and not names_subject(edit.prompt, edit.subject):
            raise InputError("subject", "this server holds each edit's same-relation neighbours still (serve --neighbours): "
                                        "give the subject, as the prompt names it" + (f"; the prompt does not name {edit.subject!r}"
                                                                                      if edit.subject else ""))
        self._check_generation_fits(edit.prompt)
        wrapped = self.editor.wrap(edit)
        ids, n_prompt = encode_answer(self.tokenizer, wrapped, edit.target)
        if len(ids) > self.max_tokens:
            field = "prompt" if n_prompt >= self.max_tokens else "target"  # which one the user should shorten
            raise InputError(field, f"prompt + target with the task instruction are {len(ids)} tokens; this model accepts at most {self.max_tokens}")

    # -- what the model says ----------------------------------------------------------------------
    def _predict(self, prompt: str) -> dict[str, Any]:
        top = top_predictions(self.model, self.tokenizer, prompt, self.limits.top_k)
        return {"top": [{"token": token, "probability": p} for token, p in top],
                "continuation": generate(self.model, self.tokenizer, prompt, self.limits.max_new_tokens)}

    def _says(self, edit: Edit) -> list[dict[str, str]]:
        """The greedy answers (first line) the headline shows: the edit prompt as the editor wraps it, the prompt as written
        (where the editor wraps it in an instruction; the next-token list and continuation beside them are this one's), the
        paraphrase, and (a model with a chat template) the question as a chat user turn."""
        forms = self.editor.asked(edit, self.tokenizer)
        asked = [("edit prompt", forms["wrapped"])] + ([("as written", forms["plain"])] if forms["plain"] != forms["wrapped"] else [])
        asked += [("paraphrase", self.editor.wrap(edit, r)) for r in edit.rephrase]
        asked += [("chat question", forms["chat"])] if "chat" in forms else []
        return [{"query": name, "prompt": prompt, "answer": answer(self.model, self.tokenizer, prompt, self.limits.max_new_tokens)}
                for name, prompt in asked]

    def _snapshot(self, edit: Edit) -> dict[str, Any]:
        view = self._predict(edit.prompt)
        view["says"] = self._says(edit)
        view["target"] = asdict(score_target(self.model, self.tokenizer, edit.prompt, edit.target))
        if self.editor.instruction is not None:  # what the editor was trained to make true (reliability)
            view["target_with_instruction"] = asdict(score_target(self.model, self.tokenizer, self.editor.wrap(edit), edit.target))
        return view

    # -- the operations the web app exposes ---------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"tasks": list(TASKS), "sentiments": list(SENTIMENTS), "limits": asdict(self.limits), "max_tokens": self.max_tokens,
                "instruction": self.editor.instruction, "edit_forms": list(self.editor.many_edit_forms), "answer_stop": self.editor.answer_stop,
                "neighbours": {"count": self.neighbours.count, "weight": self.neighbours.weight} if self.neighbours is not None else None}

    def predict(self, prompt: str) -> dict[str, Any]:
        with self.lock:
            self._check_generation_fits(prompt)
            return {"prompt": prompt, **self._predict(prompt)}

    def apply(self, edit: Edit) -> dict[str, Any]:
        """Apply ``edit`` on top of the active ones; predictions on its prompt before and after."""
        with self.lock:
            if len(self._stack) >= self.limits.max_active_edits:
                raise TooManyEditsError(f"{len(self._stack)} edits are active, the most this server keeps; roll some back first")
            self._check_edit_fits(edit)
            before = self._snapshot(edit)
            # kept on top of the others: in the forms many edits are made in (no bare question: stacked bare-question edits
            # broke most other answers, results/analysis/plain-edit-row/many-edit-forms/)
            handle = self.editor.apply(self.model, [edit], self.tokenizer, forms=self.editor.many_edit_forms, neighbours=self.neighbours)
            try:
                after = self._snapshot(edit)
            except BaseException:
                handle.rollback()
                raise
            entry = ActiveEdit(next(self._ids), edit, handle, before["top"][0]["token"], after["top"][0]["token"])
            self._stack.append(entry)
            logger.info("applied edit #%d [%s] %r -> %r", entry.id, edit.task, edit.prompt, edit.target)
            return {"edit": entry.describe(), "before": before, "after": after, "edits": self._describe(), "rounds": handle.how["rounds"]}

    def edits(self) -> list[dict[str, Any]]:
        with self.lock:
            return self._describe()

    def rollback(self, edit_id: int | None = None) -> dict[str, Any]:
        """Undo edit ``edit_id`` and every newer one (``None``: all), newest first."""
        with self.lock:
            if edit_id is None:
                start = 0
            else:
                ids = [e.id for e in self._stack]
                if edit_id not in ids:
                    raise NotFoundError(f"no active edit has id {edit_id}; active: {ids or 'none'}")
                start = ids.index(edit_id)
            undone = self._stack[start:]
            for entry in reversed(undone):
                entry.handle.rollback()
            del self._stack[start:]
            if undone:
                logger.info("rolled back edits %s", [e.id for e in undone])
            return {"rolled_back": [e.id for e in undone], "edits": self._describe()}

    def _describe(self) -> list[dict[str, Any]]:
        return [e.describe() for e in self._stack]


def page_html() -> str:
    """The demo page: one static file with inline CSS and JS, shipped as package data."""
    return resources.files("instructedit").joinpath("serve_static", "index.html").read_text(encoding="utf-8")


def create_app(editor: InstructEditor, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, model_name: str = "", editor_name: str = "",
               limits: ServeLimits | None = None, allowed_hosts: Sequence[str] | None = None, neighbours: Neighbours | None = None) -> FastAPI:
    """The FastAPI app over a new ``EditSession`` (``neighbours``: see there); ``allowed_hosts`` (None: any) are the Host
    headers it answers."""
    try:
        from fastapi import Body, FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse
        from starlette.middleware.trustedhost import TrustedHostMiddleware
    except ModuleNotFoundError as err:
        raise ValueError(f"{INSTALL_HINT} ({err.name} is missing)") from None

    session = EditSession(editor, model, tokenizer, limits, neighbours)
    html = page_html()
    app = FastAPI(title="instructedit demo", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.session = session
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    def error(status: int, message: str, field: str | None = None) -> JSONResponse:
        return JSONResponse({"detail": message, "field": field}, status_code=status)

    @app.exception_handler(InputError)
    def _input_error(request: Request, err: InputError) -> JSONResponse:
        return error(422, str(err), err.field)

    @app.exception_handler(RequestValidationError)
    def _malformed(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ("body",)))
        return error(422, f"{where}: {first.get('msg', 'invalid request')} (send a JSON object)", "body")

    @app.exception_handler(NotFoundError)
    def _not_found(request: Request, err: NotFoundError) -> JSONResponse:
        return error(404, str(err.args[0]), "id")

    @app.exception_handler(TooManyEditsError)
    def _too_many(request: Request, err: TooManyEditsError) -> JSONResponse:
        return error(409, str(err))

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                                       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return response

    # Sync endpoints: FastAPI runs them in a threadpool; the session's lock serializes the model. FastAPI
    # resolves their (postponed) annotations in this module's globals: keep those to builtins and Any.
    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return html

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"model": model_name or str(getattr(model, "name_or_path", "")), "editor": editor_name or editor.name, **session.info()}

    @app.post("/api/predict")
    def predict(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return session.predict(parse_prompt(payload, session.limits))

    @app.post("/api/edits")
    def apply_edit(payload: dict[str, Any] = Body(...)) -> dict[str, Any]:
        return session.apply(parse_edit(payload, session.limits))

    @app.get("/api/edits")
    def list_edits() -> dict[str, Any]:
        return {"edits": session.edits()}

    @app.delete("/api/edits/{edit_id}")
    def rollback(edit_id: int) -> dict[str, Any]:
        return session.rollback(edit_id)

    @app.delete("/api/edits")
    def rollback_all() -> dict[str, Any]:
        return session.rollback(None)

    return app
