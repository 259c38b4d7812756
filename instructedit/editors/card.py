"""Model cards for saved editors: README.md with base model, training data and splits, config and validation metrics."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from instructedit.config import DEFAULT_MODEL
from instructedit.io import atomic_write
from instructedit.runs import CONFIG as RUN_CONFIG, DATA, EDITOR_CONFIG, METRICS, SUMMARY

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
TRAINING_CONFIG = "training_config.yaml"  # a copy of the run's config.yaml, so a shared editor carries its settings
POOL_COPY = "instruction_pool.json"  # a copy of a custom instruction pool the editor was trained with
DEFAULT_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub id of the bundled default model
MAX_HISTORY_ROWS = 12
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def find_run_dir(editor_dir: str | Path) -> Path | None:
    """The Trainer run folder an editor checkpoint came from (``RUN/best`` -> ``RUN``), if it is still beside it."""
    run = Path(editor_dir).resolve().parent
    return run if (run / RUN_CONFIG).is_file() and (run / DATA).is_file() else None


def training_config(editor_dir: str | Path) -> dict[str, Any] | None:
    """The config the editor was trained with: its own ``training_config.yaml``, else the run folder's ``config.yaml``."""
    editor_dir = Path(editor_dir)
    run = find_run_dir(editor_dir)
    for path in (editor_dir / TRAINING_CONFIG, run / RUN_CONFIG if run else None):
        if path is not None and path.is_file():
            try:
                values = yaml.safe_load(path.read_text())
            except yaml.YAMLError as err:
                raise ValueError(f"{path} is not valid YAML: {err}") from None
            return values if isinstance(values, dict) else None
    return None


def editor_model_name(directory: str | Path) -> str | None:
    """The ``model_name`` an editor folder was trained for, if it records one."""
    path = Path(directory) / EDITOR_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"--editor {directory}: {EDITOR_CONFIG} is missing; pass a folder written by save_pretrained (e.g. RUN/best)")
    try:
        return json.loads(path.read_text()).get("model_name") or None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def base_model_id(model_name: str) -> str | None:
    """The hub id to name as ``base_model`` in the card's metadata (None for a local folder)."""
    if model_name in (DEFAULT_MODEL, "default"):
        return DEFAULT_HUB_NAME
    if _HUB_NAME.fullmatch(model_name) and not Path(model_name).expanduser().exists():
        return model_name
    return None


def write_model_card(editor_dir: str | Path, run_dir: str | Path | None = None) -> Path:
    """Write ``editor_dir/README.md``; also copy the run's config (and a custom instruction pool) into the folder.

    ``run_dir``: the Trainer's output folder (``config.yaml``, ``data.json``, ``summary.json``,
    ``metrics.jsonl``); by default the editor folder's parent when it is one. Without it the card
    describes only what ``editor_config.json`` holds.
    """
    editor_dir = Path(editor_dir)
    config_path = editor_dir / EDITOR_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{editor_dir} is not a saved editor: {EDITOR_CONFIG} is missing")
    editor_config = json.loads(config_path.read_text())
    run = Path(run_dir) if run_dir is not None else find_run_dir(editor_dir)
    if run is not None and not run.is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    config = _copy_run_config(editor_dir, run)
    data = _read_json(run / DATA) if run else None
    summary = _read_json(run / SUMMARY) if run else None
    history = _validation_history(run / METRICS) if run else []
    if not history and summary:
        history = [v for v in (summary.get("first_validation"), summary.get("last_validation")) if v]
    text = render_model_card(editor_config, config, data, summary, history)
    atomic_write(editor_dir / CARD_NAME, lambda tmp: Path(tmp).write_text(text))
    logger.info("wrote the model card %s", editor_dir / CARD_NAME)
    return editor_dir / CARD_NAME


def _copy_run_config(editor_dir: Path, run: Path | None) -> dict[str, Any] | None:
    source = run / RUN_CONFIG if run is not None else None
    if source is not None and source.is_file():
        target = editor_dir / TRAINING_CONFIG
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    config = training_config(editor_dir)
    pool = ((config or {}).get("data") or {}).get("instruction_pool")
    if pool and Path(pool).is_file() and not (editor_dir / POOL_COPY).is_file():
        shutil.copyfile(pool, editor_dir / POOL_COPY)
    return config


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _validation_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if e.get("split") == "val"]


def _thin(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """At most ``n`` rows, evenly spaced, always keeping the first and the last."""
    if len(rows) <= n:
        return rows
    picks = sorted({round(i * (len(rows) - 1) / (n - 1)) for i in range(n)})
    return [rows[i] for i in picks]


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


def render_model_card(
    editor_config: dict[str, Any],
    config: dict[str, Any] | None,
    data: dict[str, Any] | None,
    summary: dict[str, Any] | None,
    history: list[dict[str, Any]],
) -> str:
    """The README.md text (YAML metadata + Markdown) for one editor; pure, for testing."""
    model_name = editor_config.get("model_name") or "an unnamed model"
    cfg_data = (config or {}).get("data") or {}
    instructions = cfg_data.get("instructions")
    tasks = cfg_data.get("tasks") or ((data or {}).get("train") or {}).get("tasks") or []
    method = editor_config.get("method", "mend")
    if method == "ke":
        kind = "KE (Knowledge Editor)" + {True: " with instructions", False: ""}.get(instructions, "")
        about = ("A KE editor (De Cao, Aziz and Titov, EMNLP 2021): a BiLSTM encoding of the edit conditions a gate on the "
                 "fine-tuning gradient of a few MLP matrices, meta-trained with the InstructEdit objective")
    else:
        kind = {True: "InstructEdit (instruction-wrapped multi-task MEND)", False: "MEND without instructions"}.get(instructions, "MEND")
        about = ("A MEND-style hypernetwork (Mitchell et al., ICLR 2022) that turns the fine-tuning gradient of an edit into a "
                 "weight update of a few MLP matrices, meta-trained as in InstructEdit (Tian et al., IJCAI 2024)")
    meta: dict[str, Any] = {"library_name": "instructedit", "tags": ["knowledge-editing", "model-editing", method, "instructedit"]}
    if base := base_model_id(str(model_name)):
        meta["base_model"] = base
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {kind} editor for `{model_name}`", "",
             about + (f" on {', '.join(tasks)}." if tasks else "."), "",
             "## Usage", "", "```python", "import instructedit", "from instructedit import Edit", "",
             'editor = instructedit.load_editor("THIS-FOLDER-OR-HUB-ID")',
             f'model, tok = instructedit.load_model("{model_name}")',
             'with editor.apply(model, [Edit(prompt="The capital of France is", target="Rome")]) as edited:',
             '    print(edited.generate("The capital of France is"))', "# the weights are restored here", "```", ""]
    lines += ["## Base model and edited weights", "", f"- base model: `{model_name}`"]
    weights = editor_config.get("weights") or []
    if weights:
        lines.append(f"- edited weights ({len(weights)}): " + ", ".join(f"`{w['name']}` {tuple(w['shape'])}" for w in weights))
    net = editor_config.get("editor") or {}
    if net and method == "ke":
        lines.append(f"- editor network: BiLSTM {net.get('lstm_dim')}, condition {net.get('condition_dim')}, conditioners "
                     f"{net.get('conditioner_dim')} wide, initial step size {net.get('init_edit_lr')}")
    elif net:
        lines.append(f"- editor network: rank {net.get('rank')}, {net.get('n_hidden')} hidden layer(s), initial step size {net.get('init_edit_lr')}")
    lines.append("")
    lines += _data_section(cfg_data, data, instructions)
    lines += _training_section(config, summary, editor_config, history)
    if config is not None:
        lines += ["## Configuration", "", f"The full training config (also in `{TRAINING_CONFIG}`):", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _data_section(cfg_data: dict[str, Any], data: dict[str, Any] | None, instructions: bool | None) -> list[str]:
    lines = ["## Training data", ""]
    if not cfg_data and not data:
        return lines + ["Not recorded (the editor was saved outside a training run).", ""]
    if instructions is not None:
        pool = (data or {}).get("instructions") or cfg_data.get("instruction_pool") or "the project's default descriptions"
        lines.append(f"- instructions: {'on, seen descriptions from ' + str(pool) if instructions else 'off'}")
    train, val = (data or {}).get("train") or {}, (data or {}).get("val") or {}
    if train:
        lines.append(f"- split seed {train.get('seed')}, fractions (train/val/test) {train.get('fractions')}, "
                     f"balanced: {train.get('balance')}, max per task: {train.get('max_per_task')}")
        if train.get("held_out_tasks"):
            lines.append(f"- held out from training: {', '.join(train['held_out_tasks'])}")
        lines += ["", "| task | train records | val records | source files |", "|---|---|---|---|"]
        for task, count in (train.get("counts") or {}).items():
            files = ", ".join(Path(f).name for f in (train.get("files") or {}).get(task, []))
            lines.append(f"| {task} | {count} | {(val.get('counts') or {}).get(task, '–')} | {files} |")
        if val.get("used") is not None:
            lines += ["", f"Validation used the first {val['used']} validation records."]
    return lines + [""]


def _training_section(config: dict[str, Any] | None, summary: dict[str, Any] | None, editor_config: dict[str, Any],
                      history: list[dict[str, Any]]) -> list[str]:
    lines = ["## Training and validation", ""]
    t = (config or {}).get("training") or {}
    if t:
        keys = ("lr", "lr_lr", "c_edit", "c_loc", "c_margin", "batch_size", "grad_accumulation", "max_steps", "edit_loss_on", "seed")
        lines.append("- " + ", ".join(f"{k} {t[k]}" for k in keys if k in t))
    if summary:
        chosen = (f"best validation loss {_fmt(summary.get('best_val_loss'), 4)} at step {summary.get('best_step')}"
                  if summary.get("best_val_loss") is not None else "not validated: best/ is the final editor")
        lines.append(f"- trained {summary.get('steps')} optimizer steps{' (stopped early)' if summary.get('stopped_early') else ''}; {chosen}")
    step = (editor_config.get("training") or {}).get("step")
    if step is not None:
        lines.append(f"- this checkpoint: step {step}")
    if history:
        lines += ["", "| step | val loss | edit accuracy (post-edit) | edit accuracy (pre-edit) | locality |", "|---|---|---|---|---|"]
        for v in _thin(history, MAX_HISTORY_ROWS):
            lines.append(f"| {v.get('step')} | {_fmt(v.get('loss'), 4)} | {_fmt(v.get('edit_acc'))} | {_fmt(v.get('edit_acc_pre'))} | {_fmt(v.get('locality'))} |")
        lines += ["", "Edit accuracy: teacher-forced target-token accuracy on the validation edits (instruction-wrapped when "
                  "instructions are on); locality: share of locality answer tokens whose prediction the edit left unchanged."]
    if not (t or summary or history):
        lines.append("Not recorded.")
    return lines + [""]
