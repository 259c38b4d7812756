"""Sharing editors on the Hugging Face hub: push a saved editor folder, fetch one by its repo id ``org/name``."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from instructedit.editors.card import CARD_NAME, POOL_COPY, TRAINING_CONFIG, write_model_card
from instructedit.runs import EDITOR_CONFIG, EDITOR_WEIGHTS, PRESERVATION_TEXTS, PRESERVATION_WEIGHTS, SUBJECTS_FILE
from instructedit.models.hub_access import hub_fetch, hub_offline, hub_reachable, hub_timeouts, timed_out, unreachable

logger = logging.getLogger(__name__)

# What a shared editor consists of; a training checkpoint's optimizer state stays local.
SHARED_FILES = (EDITOR_CONFIG, EDITOR_WEIGHTS, PRESERVATION_WEIGHTS, PRESERVATION_TEXTS, CARD_NAME, TRAINING_CONFIG, POOL_COPY, SUBJECTS_FILE)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_id(text: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(_HUB_ID.fullmatch(text)) and not Path(text).expanduser().exists()


def push_editor(directory: str | Path, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str | None = None) -> str:
    """Upload a saved editor folder (with its model card, written here if missing) to the hub repo ``repo_id``.

    Creates the repo if needed; returns the commit URL. ``token``: a write token (default: the
    locally saved one, ``hf auth login``).
    """
    directory = Path(directory)
    for name in (EDITOR_CONFIG, EDITOR_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} is not a saved editor: {name} is missing")
    if not _HUB_ID.fullmatch(repo_id):
        raise ValueError(f"hub repo id {repo_id!r} must look like 'org/name'")
    if not (directory / CARD_NAME).is_file():
        write_model_card(directory)
    if hub_offline() or not hub_reachable():
        raise unreachable(f"push {directory} to {repo_id}", local=None)
    api = HfApi(endpoint=hub_constants.ENDPOINT, token=token)
    try:
        with hub_timeouts():
            api.create_repo(repo_id, exist_ok=True, private=private)
            info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), allow_patterns=list(SHARED_FILES),
                                     commit_message=commit_message or f"Upload instructedit editor from {directory.name}")
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code in (401, 403):
            raise PermissionError(f"the hub refused to let this token write to {repo_id!r} ({err.response.status_code}); "
                                  "pass a write token (token=...) or log in with `hf auth login`") from err
        raise
    logger.info("pushed %s to %s (%s)", directory, repo_id, info.commit_url)
    return str(info.commit_url)


def download_editor(repo_id: str, revision: str | None = None, token: str | None = None) -> Path:
    """The editor in hub repo ``repo_id`` as a local folder (the Hugging Face cache); fails fast when the hub is unreachable
    (``hub_fetch``: an offline or unreachable hub reads the cache only)."""
    kwargs = dict(repo_id=repo_id, revision=revision, token=token, allow_patterns=list(SHARED_FILES))

    def fetch(local_only: bool) -> Path:
        if local_only:
            return Path(snapshot_download(**kwargs, local_files_only=True))
        try:
            return Path(snapshot_download(**kwargs, endpoint=hub_constants.ENDPOINT))
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"hub repo {repo_id!r} does not exist (or is private: pass token=)") from None
        except LocalEntryNotFoundError as err:  # the hub answered with an error (or stopped answering) and nothing is cached
            if timed_out(err):
                raise
            raise ConnectionError(f"could not download the editor {repo_id!r} from {hub_constants.ENDPOINT}: {err}") from None

    path = hub_fetch(fetch, f"download the editor {repo_id!r}", "a local editor folder")
    if not (path / EDITOR_CONFIG).is_file():
        raise FileNotFoundError(f"hub repo {repo_id!r} holds no editor: {EDITOR_CONFIG} is missing")
    return path


def resolve_editor_dir(source: str | Path, revision: str | None = None, token: str | None = None) -> Path:
    """A local editor folder, or the download of hub repo ``source`` when it is ``org/name`` and no such folder exists."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"editor {source!r} is a file; pass the folder save_pretrained wrote (e.g. RUN/best)")
    local_parent = str(path.parent) not in ("", ".") and path.parent.is_dir()  # 'runs/best' with runs/ here: a mistyped local path
    if is_hub_id(str(source)) and not local_parent:
        return download_editor(str(source), revision=revision, token=token)
    if local_parent:
        editors = sorted(d.name for d in path.parent.iterdir() if (d / EDITOR_CONFIG).is_file() or (d / "best" / EDITOR_CONFIG).is_file())
        raise FileNotFoundError(f"editor {source!r}: there is no folder {path.name!r} in {str(path.parent)!r}"
                                + (f" (its editors and runs: {', '.join(editors[:12])}{' ...' if len(editors) > 12 else ''})" if editors else "")
                                + f"; read as a local path because {str(path.parent)!r} is a local folder, not downloaded as a hub repo id")
    raise FileNotFoundError(f"editor {source!r} is neither an existing folder nor a hub repo id 'org/name'")
