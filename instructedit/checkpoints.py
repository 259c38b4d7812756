"""The run folder of meta-training: atomic checkpoints (``last/`` resumable, ``best/`` editor only), resume, the metrics log.

A checkpoint is written into ``.NAME.tmp`` and renamed over ``NAME`` (the previous one waits as
``.NAME.old`` until then), so an interrupted write leaves a complete checkpoint behind. A resumable
checkpoint adds ``optimizer.safetensors`` (each optimizer's per-parameter tensors) and
``trainer_state.json`` (the loop's state, the optimizers' parameter groups, the fp16 loss scaler).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.amp import GradScaler

from instructedit.config import Config, save_config
from instructedit.editors.card import write_model_card
from instructedit.editors.learned import LearnedEditor, nonfinite_tensors
from instructedit.editors.base import scaled_step_sizes
from instructedit.io import atomic_write, write_json
from instructedit.runs import BEST, CHECKPOINTS, CONFIG, DATA, EDITOR_CONFIG, LAST, METRICS, SUMMARY
from instructedit.train_state import TrainState

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"
Optimizers = Mapping[str, torch.optim.Optimizer | None]  # name in the checkpoint -> optimizer (None: not used by this run)


def check_finite(editor: LearnedEditor, step: int, folder: Path) -> None:
    """Refuse to write a diverged editor (checked on every process: they hold the same editor, so all of them stop)."""
    bad = nonfinite_tensors(editor.state_dict())
    if bad:
        raise FloatingPointError(f"the editor's tensors {bad[:3]} hold NaN/Inf at step {step}; not saving "
                                 f"{folder} (lower training.lr or training.lr_lr)")


def write_checkpoint(folder: Path, editor: LearnedEditor, extra: dict[str, Any], edit_scale: float = 1.0,
                     optimizers: Optimizers | None = None, state: TrainState | None = None, scaler: GradScaler | None = None) -> None:
    """Write the editor (its step sizes × ``edit_scale``) into ``folder``; with ``optimizers``, also what resuming needs."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with scaled_step_sizes(editor, edit_scale):
        editor.save_pretrained(tmp, extra=extra)
    if optimizers is not None:
        assert state is not None and scaler is not None, "a resumable checkpoint holds the loop state and the loss scaler too"
        tensors: dict[str, torch.Tensor] = {}
        groups: dict[str, Any] = {}
        for key, opt in optimizers.items():
            if opt is None:
                continue
            sd = opt.state_dict()
            groups[key] = sd["param_groups"]
            for pid, st in sd["state"].items():
                for k, v in st.items():
                    tensors[f"{key}.{pid}.{k}"] = v.detach().cpu().contiguous()
        save_file(tensors, str(tmp / OPTIMIZER_STATE))
        saved = dict(state.__dict__) | {"grad_scaler": scaler.state_dict(), "param_groups": groups}
        (tmp / TRAINER_STATE).write_text(json.dumps(saved, indent=2))
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def is_resumable(folder: Path) -> bool:
    return (folder / TRAINER_STATE).is_file()


def recover_interrupted(folder: Path) -> None:
    """A write interrupted between its two renames left the previous checkpoint as ``.NAME.old``: put it back."""
    old = folder.with_name(f".{folder.name}.old")
    if not is_resumable(folder) and is_resumable(old):
        old.rename(folder)


def read_checkpoint(folder: Path, editor: LearnedEditor, optimizers: Optimizers, scaler: GradScaler) -> TrainState:
    """Load ``folder``'s editor, optimizer and loss-scaler states into the objects given; return the loop's state."""
    device = editor.edit_lrs.device
    editor.load_state_dict(type(editor).from_pretrained(folder, device=device).state_dict())
    raw = json.loads((folder / TRAINER_STATE).read_text())
    groups = raw.pop("param_groups")
    # read on the CPU: ``load_state_dict`` moves each state to its parameter's device and dtype, but keeps Adam's ``step``
    # where it is given (a fresh optimizer's is a CPU scalar; one on a GPU costs a device sync per parameter and step)
    tensors = load_file(str(folder / OPTIMIZER_STATE), device="cpu")
    for key, opt in optimizers.items():
        if opt is None:
            continue
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            prefix, pid, k = name.split(".", 2)
            if prefix == key:
                state.setdefault(int(pid), {})[k] = value
        opt.load_state_dict({"state": state, "param_groups": groups[key]})
    scaler_state = _pop_scaler_state(raw)
    if scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    return TrainState(**raw)


def _pop_scaler_state(raw: dict[str, Any]) -> dict[str, Any] | None:
    """The fp16 loss scaler's state in a loop state read back; checkpoints written before ``torch.amp.GradScaler``
    kept the scale as ``loss_scale`` and the overflow-free steps as ``steps_since_overflow``."""
    if "grad_scaler" in raw:
        return raw.pop("grad_scaler") or None
    scale, steps = raw.pop("loss_scale", None), raw.pop("steps_since_overflow", 0)
    if scale is None:
        return None
    interval = 2000  # the hand-written scaling doubled the scale every 2000 overflow-free steps, as GradScaler does
    return {"scale": scale, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": interval, "_growth_tracker": steps % interval}


def check_same_data(output: Path, file_sha256: Mapping[str, str]) -> None:
    """A resumed run reads the data files it started with (data.json records their SHA-256 since it started doing so)."""
    path = output / DATA
    saved = json.loads(path.read_text()).get("file_sha256") if path.is_file() else None
    if not saved:
        return
    changed = sorted(rel for rel in saved.keys() | file_sha256.keys() if saved.get(rel) != file_sha256.get(rel))
    if changed:
        raise ValueError(f"{output} was trained on other contents of the data file(s) {changed[:3]} (SHA-256 in {path}); "
                         "restore those files to resume, or train in another --output folder")


def check_fresh_start(output: Path) -> None:
    """A fresh start writes over OUTPUT/best and OUTPUT/last: refuse unless they are this recipe's own
    checkpoints (a run stopped before its first checkpoint), never delete someone's files silently."""
    ours = (output / CONFIG).is_file()  # check_resumable compared it with this config
    for name, needs in ((BEST, EDITOR_CONFIG), (LAST, TRAINER_STATE)):
        folder = output / name
        if folder.exists() and not (ours and (folder / needs).is_file()):
            raise ValueError(f"{folder} exists but is not a checkpoint of this run (no {needs}"
                             f"{'' if ours else f' and no {CONFIG} beside it'}); training would overwrite it: "
                             "use another --output folder, or move that folder away")


def start_run(output: Path, config: Config, data_info: dict[str, Any]) -> None:
    """A fresh run's record of what it trains: OUTPUT/config.yaml and OUTPUT/data.json."""
    save_config(config, output / CONFIG)
    write_json(output / DATA, data_info)


def run_summary(state: TrainState, output: Path, processes: int, records_per_step: int, data_info: dict[str, Any]) -> dict[str, Any]:
    """What OUTPUT/summary.json says about a finished run."""
    vals = state.history
    return {
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "best_step": state.best_step,
        "best_val_loss": state.best_val_loss if vals else None,  # none without a validation (training.val_every: 0)
        "best_checkpoint": str(output / BEST),
        "last_checkpoint": str(output / LAST),
        "first_validation": vals[0] if vals else None,
        "last_validation": vals[-1] if vals else None,
        "skipped_nonfinite": state.skipped_nonfinite,
        "skipped_too_long": state.skipped_too_long,
        "processes": processes,
        "records_per_step": records_per_step,
        "data": data_info,
    }


def finish_run(output: Path, summary: dict[str, Any]) -> None:
    """Write summary.json, and make best/ and last/ shareable folders (README.md model card + the run's config)."""
    write_json(output / SUMMARY, summary)
    for name in CHECKPOINTS:
        if (output / name / EDITOR_CONFIG).is_file():
            write_model_card(output / name, output)


class MetricsLog:
    """OUTPUT/metrics.jsonl (one JSON line per train / val entry) and, optionally, TensorBoard beside it.

    Only the main process of a data-parallel run writes (``enabled``); the others' writes do nothing.
    """

    def __init__(self, output: Path, enabled: bool = True) -> None:
        self.path = output / METRICS
        self.enabled = enabled
        self._tb: Any = None

    def rotate(self) -> None:
        """Keep a stale log of a run that never reached a checkpoint as metrics.jsonl.N (not appended to)."""
        if not self.path.is_file():
            return
        n = 1
        while self.path.with_name(f"{self.path.name}.{n}").exists():
            n += 1
        self.path.rename(self.path.with_name(f"{self.path.name}.{n}"))
        logger.info("starting afresh: the previous %s is kept as %s.%d", self.path.name, self.path.name, n)

    def truncate(self, step: int) -> None:
        """Drop lines written after the checkpoint a run resumes from (they will be redone)."""
        if not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))

    def open_tensorboard(self) -> None:
        if self._tb is not None or not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("training.tensorboard=true needs the tensorboard package (pip install tensorboard)") from e
        self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self._tb is not None:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{entry['split']}/{k}", v, entry["step"])
