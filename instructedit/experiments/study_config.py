"""A study's YAML: its own fields (a dataclass), the base training config it varies, checked with messages naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

from instructedit.config import read_yaml_mapping

StudyT = TypeVar("StudyT")


def read_study_yaml(path: str | Path) -> tuple[dict[str, Any], Path]:
    return read_yaml_mapping(path, "study config"), Path(path).parent


def resolve_base_config(value: str, yaml_dir: Path | None) -> Path:
    """A relative ``base_config`` is looked up from the working directory, then beside the study YAML."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.is_file() or yaml_dir is None:
        return path
    beside = yaml_dir / path
    return beside if beside.is_file() else path


def build_study(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def load_study(cls: type[StudyT], path: str | Path) -> tuple[StudyT, Path]:
    """A study config of type ``cls`` read from ``path``, and the resolved path of its base training config."""
    values, yaml_dir = read_study_yaml(path)
    cfg = build_study(cls, values, f"study config {path}")
    base = resolve_base_config(cfg.base_config, yaml_dir)
    if not base.is_file():
        raise FileNotFoundError(f"study config {path}: base_config {cfg.base_config} does not exist (relative paths: from the working directory or beside the study YAML)")
    return cfg, base
