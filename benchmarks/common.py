"""What the edit benchmarks share: their model / data / seed / threads / output options.

Imported by the scripts beside it (``python benchmarks/bench_x.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructedit.api import query_setup, untrained_queries
from instructedit.config import DEFAULT_MODEL, Config, load_config
from instructedit.editors.learned import LearnedEditor
from instructedit.editors.registry import build_editor
from instructedit.evaluation.greedy_head import BF16_FLAGS
from instructedit.models.loading import load_model
from instructedit.models.split import SplitModel
from instructedit.tasks.instructions import InstructionPool
from instructedit.tasks.prepare import TrainData, prepare_data


def add_common_arguments(parser: argparse.ArgumentParser, results: Path, threads: int = 2) -> None:
    """``--model``, ``--data-dir``, ``--seed``, ``--threads`` and ``--output`` (default ``results``)."""
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data-dir", default=None, help="data folder (default: $INSTRUCTEDIT_DATA or the project's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--output", type=Path, default=results)


def recipe_setup(config_path: Path, threads: int) -> tuple[Config, nn.Module, Any, TrainData, LearnedEditor, SplitModel]:
    """What the training benchmarks start from: ``threads`` threads, seed 0, the recipe ``config_path`` on its model, the
    prepared data, a fresh editor and its split of the model: (config, model, tokenizer, data, editor, split)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = load_config(config_path)
    model, tok = load_model(config.model.name)
    data = prepare_data(config, tok)
    editor = build_editor(model, config)
    return config, model, tok, data, editor, editor.split(model)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo) and its bfloat16 units: ratios carry across machines, seconds do not (an
    AMD EPYC Zen 4 here runs float32 products ~1.7x slower than the Xeons with AMX these benchmarks also ran on)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    units = [f for f in BF16_FLAGS if f in flags]  # those the bfloat16 greedy head looks for
    return f"{name} ({', '.join(units) or 'no bfloat16 units'})"


def rss_bytes(field: str = "VmRSS") -> int:
    """The process's resident set (``VmRSS``) or its high-water mark (``VmHWM``), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_bytes() -> int:
    """This process's peak resident set: ``VmHWM``, the high-water mark of its own memory map. Not ``ru_maxrss``: in a
    child started by ``subprocess`` that counts the parent's resident set at the fork (Linux carries the old map's
    high-water mark across ``execve``), which made a 1.4 GiB training run read 2.36 GiB under bench_mend's parent."""
    try:
        return rss_bytes("VmHWM")
    except (OSError, RuntimeError):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trained_queries(editor_dir: str | Path | None) -> tuple[InstructionPool, dict[str, Any]]:
    """The default instruction pool with the template a saved editor was trained with, and how its edits are made (its
    answer stop, edit forms and rounds, as ``runner.evaluate`` keywords): how the benchmarks ask its edits
    (``api.query_setup``). No editor: the pool and no stop, the wrapped form, one round."""
    pool = InstructionPool.default()
    setup = query_setup(editor_dir) if editor_dir is not None else untrained_queries()
    pool = dataclasses.replace(pool, template=setup["template"]) if setup["template"] else pool
    return pool, {"answer_stop": setup["answer_stop"], "edit_forms": setup["edit_forms"], "edit_rounds": setup["edit_rounds"]}
