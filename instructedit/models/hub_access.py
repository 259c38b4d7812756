"""Requests to the Hugging Face hub: offline mode, a bounded probe, a connect and read timeout on every request, errors that say how to work offline."""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx2
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import get_session

TIMEOUT_ENV = "INSTRUCTEDIT_HUB_TIMEOUT"
DEFAULT_TIMEOUT_S = 10.0  # huggingface_hub's own download and metadata timeouts
_TIMEOUT_KEYS = ("connect", "read", "write", "pool")  # httpx's timeout phases


def hub_timeout() -> float:
    """Seconds to wait for the hub to connect, and then for each part of an answer: ``$INSTRUCTEDIT_HUB_TIMEOUT``, else 10."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return seconds


def hub_offline() -> bool:
    """huggingface_hub reads HF_HUB_OFFLINE at import; read the environment too, so later changes count."""
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return hub_constants.HF_HUB_OFFLINE or any(f and f.upper() in hub_constants.ENV_VARS_TRUE_VALUES for f in flags)


def hub_reachable(timeout: float | None = None) -> bool:
    """Whether the configured endpoint answers an HTTP request (any status) within ``timeout`` to connect and to answer.

    Asked in a thread and waited for at most twice ``timeout``, because name resolution ignores
    socket timeouts. A server that accepts the connection and never answers is unreachable.
    """
    limit = hub_timeout() if timeout is None else timeout
    answered = threading.Event()

    def ask() -> None:
        with contextlib.suppress(Exception):
            get_session().head(hub_constants.ENDPOINT, timeout=httpx2.Timeout(limit), follow_redirects=False)
            answered.set()

    worker = threading.Thread(target=ask, daemon=True)
    worker.start()
    worker.join(2 * limit)
    return answered.is_set()


@contextlib.contextmanager
def hub_timeouts(seconds: float | None = None) -> Iterator[float]:
    """Cap every request huggingface_hub sends in this block (transformers' downloads included) at ``seconds`` per phase.

    A request that set no timeout (huggingface_hub's API calls) gets one; one that asked for
    longer is cut to ``seconds``: connecting, and each wait for the next bytes of the answer.
    The cap is a request hook on huggingface_hub's shared client, removed on exit.
    """
    limit = hub_timeout() if seconds is None else seconds

    def cap(request: httpx2.Request) -> None:
        asked = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            key: limit if asked.get(key) is None else min(asked[key], limit) for key in _TIMEOUT_KEYS
        }

    hooks = get_session().event_hooks["request"]
    hooks.append(cap)
    try:
        yield limit
    finally:
        hooks.remove(cap)


def timed_out(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is the hub not connecting or not answering."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, (httpx2.TimeoutException, httpx2.NetworkError)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


class HubUnreachable(ConnectionError):
    """The hub is off or did not answer (``unreachable``), as opposed to an error it answered with."""


def unreachable(action: str, local: str | None = "a local folder") -> HubUnreachable:
    """The error for a hub that is off or does not answer: what failed, why, and what to set to work offline.

    ``local``: what to pass instead of a hub name (None: the action needs the hub, e.g. a push).
    """
    if hub_offline():
        instead = f"pass {local}, or unset HF_HUB_OFFLINE to download it" if local else "unset HF_HUB_OFFLINE"
        cached = " and it is not in the local Hugging Face cache" if local else ""
        return HubUnreachable(f"cannot {action}: HF_HUB_OFFLINE is set{cached}; {instead}")
    offline = (f"to work offline set HF_HUB_OFFLINE=1 (files already in the local Hugging Face cache are used) or pass {local}; "
               if local else "")
    return HubUnreachable(f"cannot {action}: {hub_constants.ENDPOINT} did not answer within {hub_timeout():g} s. Check the network "
                           f"(or HF_ENDPOINT); {offline}{TIMEOUT_ENV} sets the wait in seconds")


T = TypeVar("T")


def hub_fetch(fetch: Callable[[bool], T], action: str, local: str | None = "a local folder") -> T:
    """``fetch(local_files_only)`` under the hub rules: an offline or unreachable hub reads the local Hugging Face cache
    only (nothing there: ``unreachable``); a reachable one is asked under ``hub_timeouts``, and a request that stops
    answering is ``unreachable`` too (a ``HubUnreachable``, what to set for offline use in its message)."""
    if hub_offline() or not hub_reachable():
        try:
            return fetch(True)
        except OSError:
            raise unreachable(action, local) from None
    with hub_timeouts():  # a hub that stops answering mid-download ends in an error, not a hang
        try:
            return fetch(False)
        except Exception as err:
            if not timed_out(err):
                raise
            raise unreachable(action, local) from err
