"""Meta-training loop: the editor learns from a task mixture; validation, early stopping, checkpoints, resume.

One code path serves the three modes: single-task MEND (one task, no instructions), multi-task
MEND (several tasks, no instructions) and InstructEdit (several tasks, instructions), in one
process or data-parallel under ``accelerate launch`` (``instructedit.distributed``; docs/distributed.md).
An optimizer step consumes ``batch_size × grad_accumulation × processes`` records of one endless,
seeded record stream; process p takes micro-batches p, p+P, p+2P, ... of each step, so P processes
with ``grad_accumulation`` g/P reproduce one process with g.
Checkpoints go to ``OUTPUT/last`` (every ``checkpoint_every`` steps and at the end) and
``OUTPUT/best`` (lowest validation loss); both are written (by rank 0) to a temporary folder and renamed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from instructedit.config import SELECTION_FIELDS, Config, check_resumable, read_yaml_mapping, save_config
from instructedit.distributed import Distributed, device_map_placement
from instructedit.editors.card import EDITOR_CONFIG, write_model_card
from instructedit.editors.mend import MENDEditor, nonfinite_tensors
from instructedit.io import atomic_write, file_sha256, write_json
from instructedit.memory import CheckpointedSplitModel, estimate_memory
from instructedit.models.architectures import ArchSpec, arch_spec, resolve_editable_weights
from instructedit.models.loading import load_model
from instructedit.objective import meta_loss
from instructedit.records import EditRecord, MetaBatch
from instructedit.tasks.collate import Collator, PromptTooLongError
from instructedit.tasks.instructions import InstructionPool
from instructedit.tasks.splits import build_mixture

logger = logging.getLogger(__name__)

LOC_WEIGHT_RANGE = (0.01, 1000.0)  # bounds of the locality_target multiplier
FP16_INITIAL_LOSS_SCALE = 2.0**16
FP16_SCALE_GROWTH_INTERVAL = 2000  # overflow-free steps before the loss scale doubles (torch.amp's default)


class NoValidationRecords(ValueError):
    """None of the validation records fits ``model.max_length``."""


@dataclass
class TrainData:
    train: list[EditRecord]
    val: list[EditRecord]
    collator: Collator
    pool: InstructionPool | None
    info: dict[str, Any]


@dataclass
class TrainState:
    """Everything besides tensors needed to resume exactly."""

    step: int = 0  # optimizer steps done
    records_seen: int = -1  # position in the training record stream; -1: step × records per step (older checkpoints)
    best_val_loss: float = math.inf
    best_step: int = -1
    best_score: float = -math.inf  # training.select_on "generation": the selection score of best/
    validations_since_best: int = 0
    skipped_nonfinite: int = 0
    skipped_too_long: int = 0
    stopped_early: bool = False
    loss_scale: float = 1.0  # float16 base models: dynamic loss scale of the meta-loss
    steps_since_overflow: int = 0
    loc_weight: float = 1.0  # training.locality_target: multiplier of the locality terms
    loc_running: float | None = None  # running mean of the training locality the multiplier follows
    history: list[dict[str, float]] = field(default_factory=list)  # validation results


def device_for(config: Config) -> torch.device:
    if config.training.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.training.device)


def build_editor(model: torch.nn.Module, config: Config) -> MENDEditor:
    """A fresh MEND editor for ``model``'s inner weights as the config names them."""
    override = None
    if config.model.architecture:
        a = config.model.architecture
        override = ArchSpec(a["layers"], a["final_norm"], tuple(a["mlp_modules"]), bool(a.get("conv1d", False)))
    spec = arch_spec(model, override)
    weights = resolve_editable_weights(model, spec, config.model.edit_weights or None, config.model.last_n_layers)
    return MENDEditor(weights, config.editor, override, config.model.name)


def instruction_pool(config: Config) -> InstructionPool | None:
    """The training pool of ``config`` (None without instructions), with ``data.template`` if it sets one."""
    if not config.data.instructions:
        return None
    pool = InstructionPool.from_file(config.data.instruction_pool) if config.data.instruction_pool else InstructionPool.default()
    return dataclasses.replace(pool, template=config.data.template) if config.data.template else pool


def instruction_setup(config: Config) -> dict[str, Any]:
    """What evaluating an editor needs to query it as it was trained; saved in its editor_config.json."""
    pool = instruction_pool(config)
    return {"instructions": config.data.instructions, "instruction_pool": config.data.instruction_pool,
            "template": pool.template if pool else None, "answer_stop": config.training.answer_stop}


def prepare_data(config: Config, tokenizer) -> TrainData:
    d = config.data
    common = dict(data_dir=d.data_dir, seed=d.split_seed, fractions=d.split_fractions, balance=d.balance, max_per_task=d.max_per_task)
    train = build_mixture(d.tasks, "train", **common)
    val = build_mixture(d.tasks, "val", **common)
    pool = instruction_pool(config)
    fallback = [item for r in train.records for item in r.locality]
    collator = Collator(tokenizer, config.model.max_length, pool, fallback_locality=fallback, answer_stop=config.training.answer_stop)
    val_records = val.records[: config.training.val_size]
    hashes = {rel: file_sha256(Path(train.data_dir) / rel) for files in train.files.values() for rel in files}
    info = {"train": train.to_dict(), "val": val.to_dict() | {"used": len(val_records)}, "instructions": pool.source if pool else None,
            "file_sha256": hashes}
    return TrainData(train.records, val_records, collator, pool, info)


class Trainer:
    """Runs meta-training for ``config`` into ``output_dir``; resumes from ``output_dir/last``.

    In a data-parallel run (``accelerate launch``) every process builds its own Trainer; see the
    module docstring for how they share the work.
    """

    def __init__(self, config: Config, output_dir: str | Path, model=None, tokenizer=None, show_progress: bool = True) -> None:
        self.config = config
        self.output = Path(output_dir)
        self.dist = Distributed.from_environment(cpu=config.training.device == "cpu")
        device_map = config.model.device_map
        if device_map is not None and self.dist.local_world_size > 1:
            raise ValueError(
                f"config field 'model.device_map': {device_map!r} spreads the model over this machine's GPUs, but "
                f"{self.dist.local_world_size} processes run on it; launch one process per machine, or set model.device_map=null"
            )
        self.output.mkdir(parents=True, exist_ok=True)
        self.device = self.dist.device if self.dist.enabled and device_map is None else device_for(config)
        if model is None:
            model, tokenizer = load_model(config.model.name, dtype=config.model.dtype, device=str(self.device), device_map=device_map)
        self.model, self.tokenizer = model, tokenizer
        self.data = prepare_data(config, tokenizer)
        torch.manual_seed(config.training.seed)
        self.editor = build_editor(model, config)
        if device_map is not None:
            self.device, editor_device = device_map_placement(model, self.editor)
        else:
            editor_device = self.device
        self.editor.to(editor_device)
        self.dist.attach(self.editor)
        self.split = self.editor.split(model)
        t = config.training
        if t.activation_checkpointing:
            self.split = CheckpointedSplitModel(model, self.split.spec, self.split.first_layer)
        self.opt = torch.optim.Adam(self.editor.network_parameters + [self.editor.edit_lrs], lr=t.lr)
        self.lr_opt = torch.optim.Adam([self.editor.edit_lrs], lr=t.lr_lr) if t.lr_lr > 0 else None
        self.state = TrainState(loss_scale=FP16_INITIAL_LOSS_SCALE if config.model.dtype == "float16" else 1.0)
        self.show_progress = show_progress and self.dist.is_main
        self._tb = None

    @property
    def records_per_step(self) -> int:
        t = self.config.training
        return t.batch_size * t.grad_accumulation * self.dist.world_size

    # -- data ----------------------------------------------------------------------------------
    def _instruction(self, record: EditRecord) -> int | None:
        pool = self.data.pool
        return pool.training_index(record, self.config.data.instruction_seed) if pool else None

    def _record_at(self, index: int) -> EditRecord:
        """The index-th training record of an endless, per-epoch reshuffled stream (resume-exact)."""
        n = len(self.data.train)
        epoch, offset = divmod(index, n)
        order = list(range(n))
        random.Random(f"{self.config.training.seed}:epoch{epoch}").shuffle(order)
        return self.data.train[order[offset]]

    def _batch(self, records: list[EditRecord]) -> MetaBatch:
        batch = self.data.collator.meta_batch(records, [self._instruction(r) for r in records], self.config.training.edit_loss_on)
        return batch.to(self.device)

    # -- loop ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t = self.config.training
        check_resumable(self.config, self.output)  # never continue a run with another recipe
        resumed = self._maybe_resume()
        if resumed:
            self._reselect_if_changed()
        self.dist.broadcast_module(self.editor)  # identical by construction; this makes it certain
        if self.dist.is_main:
            self._log_memory_estimate()
            if self.dist.enabled:
                logger.info("data parallel over %d processes: %d records per optimizer step", self.dist.world_size, self.records_per_step)
        if not resumed:
            self._check_fresh_start()
            if self.dist.is_main:
                self._rotate_log()
                save_config(self.config, self.output / "config.yaml")
                write_json(self.output / "data.json", self.data.info)
            self.validate()  # the starting point: pre-training editor
        self._open_logs()
        bar = tqdm(total=t.max_steps, initial=self.state.step, desc="meta-train", disable=not self.show_progress, dynamic_ncols=True)
        running: dict[str, float] = {}
        started = time.time()
        while self.state.step < t.max_steps and not self.state.stopped_early:
            metrics = self.train_step()
            if metrics is None:
                continue
            self.state.step += 1
            running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in metrics.items()}
            bar.update(1)
            bar.set_postfix({k: f"{running[k]:.3f}" for k in ("loss", "l_edit", "l_loc", "edit_acc", "locality", "loc_weight") if k in running})
            if self.state.step % t.log_every == 0:
                self._log({"step": self.state.step, "split": "train", **metrics, "elapsed_s": time.time() - started})
            if self.state.step % t.val_every == 0:
                self.validate()
            if self.state.step % t.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        if self.state.step % t.val_every != 0 and not self.state.stopped_early:
            self.validate()
        self.save_checkpoint()
        summary = self.summary()
        if self.dist.is_main:
            write_json(self.output / "summary.json", summary)
            for name in ("best", "last"):  # shareable folders: README.md model card + the run's config
                if (self.output / name / EDITOR_CONFIG).is_file():
                    write_model_card(self.output / name, self.output)
        self.dist.barrier()  # every process returns once the run folder is complete
        return summary

    def _log_memory_estimate(self) -> None:
        device = "cuda" if self.device.type == "cuda" else "cpu"
        try:
            estimate = estimate_memory(self.config, self.model, device)
        except (AttributeError, ValueError) as e:  # an architecture the estimate does not know; training does not need it
            logger.warning("no memory estimate for %s: %s", self.config.model.name, e)
            return
        logger.info("memory estimate per process (%s):\n%s", device, estimate.format())

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step over ``grad_accumulation`` batches per process; None if every batch was skipped."""
        t = self.config.training
        world, rank = self.dist.world_size, self.dist.rank
        self.editor.train()
        self.opt.zero_grad(set_to_none=True)
        if self.lr_opt:
            self.lr_opt.zero_grad(set_to_none=True)
        if self.state.records_seen < 0:
            self.state.records_seen = self.state.step * self.records_per_step
        totals: dict[str, float] = {}
        used = nonfinite = too_long = 0
        for micro in range(t.grad_accumulation):
            start = self.state.records_seen + (micro * world + rank) * t.batch_size  # global micro-batch micro·P + rank
            records = [self._record_at(start + i) for i in range(t.batch_size)]
            try:
                batch = self._batch(records)
            except PromptTooLongError as e:
                too_long += 1
                logger.warning("skipping a batch: %s", e)
                self.dist.skip_statistics(self.editor)  # the other processes merge their statistics of this round
                continue
            w = self.state.loc_weight
            loss, metrics = meta_loss(self.editor, self.split, batch, t.c_edit, t.c_loc * w, t.c_margin * w, t.c_answer_margin, t.answer_margin_cap)
            if not torch.isfinite(loss):
                nonfinite += 1
                logger.warning("non-finite loss at step %d (%s); skipped", self.state.step, records[0].source)
                continue
            scaled = loss * self.state.loss_scale if self.state.loss_scale != 1.0 else loss
            (scaled / t.grad_accumulation).backward()
            used += 1
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
        self.state.records_seen += self.records_per_step  # consumed even when skipped: a bad record cannot loop forever
        used, nonfinite, too_long = self.dist.sum({"used": used, "nonfinite": nonfinite, "too_long": too_long}).values()
        totals = self.dist.sum(totals)
        self.state.skipped_too_long += too_long
        if nonfinite:
            self.state.skipped_nonfinite += nonfinite
            if self.state.skipped_nonfinite >= t.max_bad_steps:
                raise FloatingPointError(
                    f"{self.state.skipped_nonfinite} non-finite losses by step {self.state.step} (training.max_bad_steps="
                    f"{t.max_bad_steps}); stopping: lower training.lr or check the data. {self.output / 'last'} holds the last checkpoint, if any")
        if used == 0:
            self.state.step += 1
            return None
        params = self.editor.network_parameters + [self.editor.edit_lrs]
        self.dist.average_gradients(params)
        if self.state.loss_scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.state.loss_scale)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        if not torch.isfinite(grad_norm):
            self.state.skipped_nonfinite += 1
            self._overflow()
            self.state.step += 1
            return None
        self._set_learning_rates()
        self.opt.step()
        if self.lr_opt:
            self.lr_opt.step()
        self._no_overflow()
        metrics = {k: v / used for k, v in totals.items()} | {"grad_norm": float(grad_norm)}
        if t.locality_target is not None:
            metrics["loc_weight"] = self.state.loc_weight  # the weight this step trained with
            self._follow_locality_target(metrics["locality"])
        return metrics

    def lr_factor(self) -> float:
        """The learning-rate multiplier of the step about to be taken (a function of the step alone: resume stays exact)."""
        t = self.config.training
        if t.lr_schedule == "constant":
            return 1.0
        return 1.0 - (1.0 - t.lr_final_ratio) * min(self.state.step / max(t.max_steps - 1, 1), 1.0)

    def _set_learning_rates(self) -> None:
        t, factor = self.config.training, self.lr_factor()
        for opt, base in ((self.opt, t.lr), (self.lr_opt, t.lr_lr)):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = base * factor

    def _follow_locality_target(self, locality: float) -> None:
        """Multiplicative update of the locality weight toward ``training.locality_target`` (a Lagrange-style constraint)."""
        t = self.config.training
        running = locality if self.state.loc_running is None else 0.95 * self.state.loc_running + 0.05 * locality
        self.state.loc_running = running
        weight = self.state.loc_weight * math.exp(t.locality_target_rate * (t.locality_target - running))
        self.state.loc_weight = min(max(weight, LOC_WEIGHT_RANGE[0]), LOC_WEIGHT_RANGE[1])

    def _overflow(self) -> None:
        if self.config.model.dtype == "float16":
            self.state.loss_scale = max(self.state.loss_scale / 2, 1.0)
            self.state.steps_since_overflow = 0
            logger.info("float16 gradient overflow at step %d: loss scale lowered to %g", self.state.step, self.state.loss_scale)
        else:
            logger.warning("non-finite gradient norm at step %d; step skipped", self.state.step)

    def _no_overflow(self) -> None:
        if self.config.model.dtype == "float16":
            self.state.steps_since_overflow += 1
            if self.state.steps_since_overflow % FP16_SCALE_GROWTH_INTERVAL == 0:
                self.state.loss_scale *= 2

    @torch.no_grad()
    def evaluate_records(self, records: list[EditRecord]) -> dict[str, float]:
        """Mean meta-loss terms and edit accuracy / locality over ``records`` (editor in eval mode)."""
        t = self.config.training
        self.editor.eval()
        totals: dict[str, float] = {}
        n = 0
        for record in records:
            try:
                batch = self._batch([record])
            except PromptTooLongError:
                continue
            _, metrics = meta_loss(self.editor, self.split, batch, t.c_edit, t.c_loc, t.c_margin, t.c_answer_margin, t.answer_margin_cap)  # edit() takes its own grad
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
            n += 1
        if n == 0:
            raise NoValidationRecords(f"none of the {len(records)} validation records fits model.max_length={self.config.model.max_length} tokens")
        return {k: v / n for k, v in totals.items()} | {"n": n}

    def validate(self) -> dict[str, float]:
        shard = self.data.val[self.dist.rank :: self.dist.world_size]  # every P-th record (all of them in one process)
        try:
            local = self.evaluate_records(shard)
        except NoValidationRecords:
            if not self.dist.enabled:
                raise
            local = {"n": 0}
        metrics = self.dist.mean(local)  # the same on every process: early stopping agrees
        if metrics["n"] == 0:
            raise NoValidationRecords(f"none of the {len(self.data.val)} validation records fits model.max_length={self.config.model.max_length} tokens")
        t = self.config.training
        # Every process (selection and early stopping agree); not at step 0, where the identity-initialized network's
        # tiny step sizes edit nothing yet and asking the model would only cost time.
        if (t.val_generation or t.select_on == "generation") and self.state.step > 0:
            metrics |= self._generation_validation()
        entry = {"step": self.state.step, "split": "val", **metrics}
        self.state.history.append(entry)
        self._log(entry)
        if self.dist.is_main:
            gen = f" | generation: reliability {metrics['gen_reliability']:.3f} locality {metrics['gen_locality']:.3f}" if "gen_reliability" in metrics else ""
            logger.info("validation @%d: loss %.4f edit_acc %.3f (pre %.3f) locality %.3f%s", self.state.step, metrics["loss"], metrics["edit_acc"], metrics["edit_acc_pre"], metrics["locality"], gen)
        if self._improves(metrics):
            self.state.best_val_loss = min(self.state.best_val_loss, metrics["loss"])
            self.state.best_step = self.state.step
            self.state.validations_since_best = 0
            self._save_dir("best", with_optimizer=False, edit_scale=metrics.get("edit_scale", 1.0))
        else:
            self.state.validations_since_best += 1
            patience = self.config.training.early_stop_patience
            if patience and self.state.validations_since_best >= patience:
                if self.dist.is_main:
                    logger.info("early stopping at step %d: no validation improvement in %d validations", self.state.step, patience)
                self.state.stopped_early = True
        return metrics

    def _reselect_if_changed(self) -> None:
        """A resume that changes how best/ is chosen (locality_floor, edit_scales) re-selects it from the next validation on."""
        saved = read_yaml_mapping(self.output / "config.yaml", "run config").get("training", {})
        current = self.config.to_dict()["training"]
        changed = [k for k in SELECTION_FIELDS if k in saved and json.dumps(saved[k]) != json.dumps(current[k])]
        if not changed:
            return
        if self.dist.is_main:
            logger.warning("resuming %s with another selection (%s): best/ is chosen again from the next validation on",
                           self.output, ", ".join(f"{k} {saved[k]} -> {current[k]}" for k in changed))
            save_config(self.config, self.output / "config.yaml")
        self.state.best_score = -math.inf

    def _generation_validation(self) -> dict[str, float]:
        """Generation reliability / locality of the current editor on the validation records, at the α multiplier
        (``training.edit_scales``) that validates best; the per-multiplier results are logged too."""
        from instructedit.evaluation.generation_check import choose_scale, generation_scores

        t, records = self.config.training, self.data.val
        per_scale = generation_scores(self.model, self.tokenizer, self.editor, self.data.collator, records,
                                      [self._instruction(r) for r in records], t.edit_scales)
        scale = choose_scale(per_scale, t.locality_floor)
        if not per_scale[scale].get("gen_n"):
            return {}
        extra = {f"{k}@{s:g}": v for s, scores in per_scale.items() for k, v in scores.items() if k != "gen_n"} if len(per_scale) > 1 else {}
        return per_scale[scale] | {"edit_scale": scale} | extra

    def _improves(self, metrics: dict[str, float]) -> bool:
        """Whether this validation's editor becomes best/: lowest loss, or (select_on generation) highest
        generation reliability among checkpoints at or above the generation-locality floor."""
        from instructedit.evaluation.generation_check import selection_score

        t = self.config.training
        if t.select_on == "loss" or "gen_reliability" not in metrics:
            return metrics["loss"] < self.state.best_val_loss
        score = selection_score(metrics, t.locality_floor)
        if score > self.state.best_score:
            self.state.best_score = score
            return True
        return False

    # -- persistence ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        self._save_dir("last", with_optimizer=True)

    def _save_dir(self, name: str, with_optimizer: bool, edit_scale: float = 1.0) -> None:
        """Write the editor (its step sizes × ``edit_scale``, the generation-calibrated multiplier) into OUTPUT/name."""
        from instructedit.evaluation.generation_check import scaled_step_sizes

        bad = nonfinite_tensors(self.editor.state_dict())
        if bad:  # checked on every process (they hold the same editor), so all of them stop
            raise FloatingPointError(f"the editor's tensors {bad[:3]} hold NaN/Inf at step {self.state.step}; not saving "
                                     f"{self.output / name} (lower training.lr or training.lr_lr)")
        if not self.dist.is_main:  # every process holds the same editor and optimizer state
            return
        final = self.output / name
        tmp = self.output / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        extra = {"training": {"step": self.state.step, "best_step": self.state.best_step, "best_val_loss": self.state.best_val_loss,
                              "edit_scale": edit_scale},
                 "queries": instruction_setup(self.config)}
        with scaled_step_sizes(self.editor, edit_scale):
            self.editor.save_pretrained(tmp, extra=extra)
        if with_optimizer:
            tensors: dict[str, torch.Tensor] = {}
            groups: dict[str, Any] = {}
            for key, opt in (("opt", self.opt), ("lr_opt", self.lr_opt)):
                if opt is None:
                    continue
                sd = opt.state_dict()
                groups[key] = sd["param_groups"]
                for pid, st in sd["state"].items():
                    for k, v in st.items():
                        tensors[f"{key}.{pid}.{k}"] = v.detach().cpu().contiguous()
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            state = dict(self.state.__dict__) | {"param_groups": groups}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
        old = self.output / f".{name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _maybe_resume(self) -> bool:
        last = self.output / "last"
        if self.dist.is_main and not (last / "trainer_state.json").is_file():
            old = self.output / ".last.old"  # interrupted between the two renames
            if (old / "trainer_state.json").is_file():
                old.rename(last)
        self.dist.barrier()
        found = (last / "trainer_state.json").is_file()
        self.dist.check_same(found, f"whether {last} holds a checkpoint (a multi-machine run needs --output on a shared filesystem)")
        if not found:
            return False
        self._check_same_data()
        editor_device = self.editor.edit_lrs.device
        loaded = MENDEditor.from_pretrained(last, device=editor_device)
        self.editor.load_state_dict(loaded.state_dict())
        raw = json.loads((last / "trainer_state.json").read_text())
        groups = raw.pop("param_groups")
        self.state = TrainState(**raw)
        tensors = load_file(str(last / "optimizer.safetensors"), device=str(editor_device))
        for key, opt in (("opt", self.opt), ("lr_opt", self.lr_opt)):
            if opt is None:
                continue
            state: dict[int, dict[str, torch.Tensor]] = {}
            for name, value in tensors.items():
                prefix, pid, k = name.split(".", 2)
                if prefix == key:
                    state.setdefault(int(pid), {})[k] = value
            opt.load_state_dict({"state": state, "param_groups": groups[key]})
        self.dist.check_same(self.state.step, f"the step of the checkpoint in {last}")
        if self.dist.is_main:
            self._truncate_log()
            logger.info("resumed from %s at step %d", last, self.state.step)
        return True

    def _check_same_data(self) -> None:
        """A resumed run reads the data files it started with (data.json records their SHA-256 since it started doing so)."""
        path = self.output / "data.json"
        saved = json.loads(path.read_text()).get("file_sha256") if path.is_file() else None
        if not saved:
            return
        now = self.data.info["file_sha256"]
        changed = sorted(rel for rel in saved.keys() | now.keys() if saved.get(rel) != now.get(rel))
        if changed:
            raise ValueError(f"{self.output} was trained on other contents of the data file(s) {changed[:3]} (SHA-256 in {path}); "
                             "restore those files to resume, or train in another --output folder")

    def _check_fresh_start(self) -> None:
        """A fresh start writes over OUTPUT/best and OUTPUT/last: refuse unless they are this recipe's own
        checkpoints (a run stopped before its first checkpoint), never delete someone's files silently."""
        ours = (self.output / "config.yaml").is_file()  # check_resumable compared it with this config
        for name, needs in (("best", EDITOR_CONFIG), ("last", "trainer_state.json")):
            folder = self.output / name
            if folder.exists() and not (ours and (folder / needs).is_file()):
                raise ValueError(f"{folder} exists but is not a checkpoint of this run (no {needs}"
                                 f"{'' if ours else ' and no config.yaml beside it'}); training would overwrite it: "
                                 "use another --output folder, or move that folder away")

    def _rotate_log(self) -> None:
        """Keep a stale metrics.jsonl of a run that never reached a checkpoint as metrics.jsonl.N (not appended to)."""
        path = self.output / "metrics.jsonl"
        if not path.is_file():
            return
        n = 1
        while path.with_name(f"{path.name}.{n}").exists():
            n += 1
        path.rename(path.with_name(f"{path.name}.{n}"))
        logger.info("starting afresh: the previous %s is kept as %s.%d", path.name, path.name, n)

    def _open_logs(self) -> None:
        if self.config.training.tensorboard and self._tb is None and self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("training.tensorboard=true needs the tensorboard package (pip install tensorboard)") from e
            self._tb = SummaryWriter(str(self.output / "tensorboard"))

    def _log(self, entry: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.output / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self._tb is not None:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{entry['split']}/{k}", v, entry["step"])

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone)."""
        path = self.output / "metrics.jsonl"
        if not path.is_file():
            return
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= self.state.step]
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(line + "\n" for line in keep)))

    def summary(self) -> dict[str, Any]:
        vals = self.state.history
        return {
            "steps": self.state.step,
            "stopped_early": self.state.stopped_early,
            "best_step": self.state.best_step,
            "best_val_loss": self.state.best_val_loss,
            "best_checkpoint": str(self.output / "best"),
            "last_checkpoint": str(self.output / "last"),
            "first_validation": vals[0] if vals else None,
            "last_validation": vals[-1] if vals else None,
            "skipped_nonfinite": self.state.skipped_nonfinite,
            "skipped_too_long": self.state.skipped_too_long,
            "processes": self.dist.world_size,
            "records_per_step": self.records_per_step,
            "data": self.data.info,
        }


def train(config: Config, output_dir: str | Path, show_progress: bool = True) -> dict[str, Any]:
    """Meta-train an editor as ``config`` says; returns the run summary (also in OUTPUT/summary.json)."""
    return Trainer(config, output_dir, show_progress=show_progress).run()
