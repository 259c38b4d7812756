"""Atomic file writes (results and checkpoints are never left half-written), JSON that may be gzipped, file fingerprints."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    # created as a plain open creates a file (0666 minus the umask), not 0600 as mkstemp would, which hid results and
    # checkpoints from the rest of a group
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


GZ = ".gz"  # a JSON path ending so is written and read gzipped: per-case reports of hundreds of cases shrink ~13x


def write_json(path: str | Path, data: Any) -> Path:
    """Atomically write ``data`` as indented JSON; gzipped when ``path`` ends in .gz (no name or time in the gzip
    header, so the same data gives the same bytes)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    if str(path).endswith(GZ):
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(gzip.compress(text.encode(), mtime=0)))
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``, gunzipped first when it is a gzip file (by its first bytes, whatever its name)."""
    raw = Path(path).read_bytes()
    return json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)


def append_jsonl(path: str | Path, entry: Any) -> None:
    """Append ``entry`` to ``path`` as one JSON line, in one write, flushed to the disk before returning: a crash leaves at
    most the last line cut short, which a reader can tell and drop."""
    with open(path, "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def json_stem(path: str | Path) -> Path:
    """``path`` without its .json or .json.gz ending: where a report's Markdown (``.md``) and figures go beside it."""
    path = Path(path)
    name = path.name
    for ending in (".json" + GZ, ".json"):
        if name.endswith(ending):
            return path.with_name(name[: -len(ending)])
    raise ValueError(f"{path}: a JSON path must end in .json or .json.gz")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
