"""Meta-training loop: the editor learns from a task mixture; validation, early stopping, checkpoints, resume.

One code path serves single-task MEND, multi-task MEND and InstructEdit (several tasks, instructions), in
one process or data-parallel under ``accelerate launch`` (``instructedit.distributed``; docs/distributed.md).
An optimizer step consumes ``batch_size (or n_edits) × grad_accumulation × processes`` records of one endless, seeded
record stream; process p takes micro-batches p, p+P, p+2P, ... of each step, so P processes with
``grad_accumulation`` g/P reproduce one process with g. ``OUTPUT/last`` (every ``checkpoint_every`` steps
and at the end) and ``OUTPUT/best`` are written by rank 0 (``instructedit.checkpoints``).
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from instructedit.checkpoints import (
    MetricsLog, check_finite, check_fresh_start, check_same_data, finish_run, is_resumable, read_checkpoint, recover_interrupted,
    run_summary, start_run, write_checkpoint,
)
from instructedit.config import Config, check_resumable, save_config, selection_changes
from instructedit.distributed import Distributed, device_map_placement
from instructedit.editors.registry import build_editor
from instructedit.evaluation.generation_check import validation_scores
from instructedit.memory import log_estimate
from instructedit.models.loading import load_model
from instructedit.models.split import CheckpointedSplitModel
from instructedit.objective import batched_meta_loss, many_edits_loss, meta_loss, one_pass, packing_matches, per_record_meta_loss
from instructedit.records import EditRecord, MetaBatch
from instructedit.runs import BEST, CONFIG, LAST
from instructedit.tasks.collate import PromptTooLongError
from instructedit.tasks.instructions import trained_query_setup
from instructedit.tasks.prepare import prepare_data, record_at
from instructedit.train_state import TrainState

logger = logging.getLogger(__name__)


class NoValidationRecords(ValueError):
    """None of the validation records fits ``model.max_length``."""


class Trainer:
    """Runs meta-training for ``config`` into ``output_dir``; resumes from ``output_dir/last``.

    In a data-parallel run every process builds its own Trainer (the module docstring says how they share the work).
    """

    def __init__(self, config: Config, output_dir: str | Path, model=None, tokenizer=None, show_progress: bool = True) -> None:
        self.config = config
        self.output = Path(output_dir)
        self.dist = Distributed.from_environment(cpu=config.training.device == "cpu")
        device_map = config.model.device_map
        self.device = self.dist.model_device(config.training.device, device_map)
        self.output.mkdir(parents=True, exist_ok=True)
        if model is None:
            model, tokenizer = load_model(config.model.name, dtype=config.model.dtype, device=str(self.device), device_map=device_map)
        self.model, self.tokenizer = model, tokenizer
        self.data = prepare_data(config, tokenizer)
        torch.manual_seed(config.training.seed)
        self.editor = build_editor(model, config)
        editor_device = self.device
        if device_map is not None:  # batches go where the embeddings are, the editor beside the edited blocks
            self.device, editor_device = device_map_placement(model, self.editor)
        self.editor.to(editor_device)
        self.dist.attach(self.editor)
        self.split = self.editor.split(model)
        t = config.training
        if t.activation_checkpointing:
            self.split = CheckpointedSplitModel(model, self.split.spec, self.split.first_layer)
        # one-edit steps run their inputs as one packed row, many-edit steps as packed rows, where that gives the same loss
        self.packing: dict[bool, bool] = {}  # many -> decided on the first batch
        self.opt = torch.optim.Adam(self.editor.network_parameters + [self.editor.edit_lrs], lr=t.lr)
        self.lr_opt = torch.optim.Adam([self.editor.edit_lrs], lr=t.lr_lr) if t.lr_lr > 0 else None
        self.optimizers = {"opt": self.opt, "lr_opt": self.lr_opt}  # their names in the checkpoint
        # float16 base models: a dynamic loss scale keeps the gradients flowing back through the model from underflowing
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.model.dtype == "float16")
        self.state = TrainState()
        self.show_progress = show_progress and self.dist.is_main
        self.log = MetricsLog(self.output, enabled=self.dist.is_main)

    @property
    def records_per_step(self) -> int:
        t = self.config.training
        return t.edits_per_call * t.grad_accumulation * self.dist.world_size

    def _batch(self, records: list[EditRecord]) -> MetaBatch:
        batch = self.data.collator.meta_batch(records, self.data.instructions(records, self.config.data.instruction_seed),
                                              self.config.training.edit_loss_on, self.config.training.locality_frames)
        return batch.to(self.device)

    # -- loop ----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        t = self.config.training
        check_resumable(self.config, self.output)  # never continue a run with another recipe
        resumed = self._maybe_resume()
        self.dist.broadcast_module(self.editor)  # identical by construction; this makes it certain
        if self.dist.is_main:
            log_estimate(self.config, self.model, "cuda" if self.device.type == "cuda" else "cpu")
            if self.dist.enabled:
                logger.info("data parallel over %d processes: %d records per optimizer step", self.dist.world_size, self.records_per_step)
        if not resumed:
            check_fresh_start(self.output)
            if self.dist.is_main:
                self.log.rotate()
                start_run(self.output, self.config, self.data.info)
            if t.validate_at_start:
                self.validate()  # the starting point: pre-training editor
        if t.tensorboard:
            self.log.open_tensorboard()
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
                self.log.write({"step": self.state.step, "split": "train", **metrics, "elapsed_s": time.time() - started})
            if t.val_every and self.state.step % t.val_every == 0:
                self.validate()
            if self.state.step % t.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        starts = self.split.starts
        if starts.reused_tokens:
            total = starts.reused_tokens + starts.passed_tokens
            logger.info("the blocks below the edited ones passed %d of the steps' %d tokens: %.0f %% were task instructions they "
                        "had passed before (models.split.StartCache)", starts.passed_tokens, total, 100 * starts.reused_tokens / total)
        if not t.val_every:  # no validation: the final editor is best/
            self.state.best_step = self.state.step
            self._save_dir(BEST, with_optimizer=False, edit_scale=t.edit_scales[0])
        elif self.state.step % t.val_every != 0 and not self.state.stopped_early:
            self.validate()
        self.save_checkpoint()
        summary = run_summary(self.state, self.output, self.dist.world_size, self.records_per_step, self.data.info)
        if self.dist.is_main:
            finish_run(self.output, summary)
        self.dist.barrier()  # every process returns once the run folder is complete
        return summary

    def train_step(self) -> dict[str, float] | None:
        """One optimizer step over ``grad_accumulation`` micro-batches per process; None if it was skipped."""
        t, w = self.config.training, self.state.loc_weight
        self._start_step()
        totals: dict[str, float] = {}
        counts = {"used": 0, "nonfinite": 0, "too_long": 0}
        context = ({"c_context": t.c_loc_context * w} if t.c_loc_context else {}) | (  # meta_loss only (config.py checks n_edits)
            {"loc_scale": t.locality_scale} if t.locality_scale != 1 else {})
        for micro in range(t.grad_accumulation):
            records, batch = self._micro_batch(micro)
            if batch is None:
                counts["too_long"] += 1
                continue
            objective = self._objective(batch)
            pieces = [(objective, batch, records[0].source)]
            if objective is batched_meta_loss and not one_pass(self.split, batch):
                # records whose rows are long run one after another, each forward and backward (batch 1's memory, the same mean)
                pieces = [(self._objective(b), b, r.source) for b, r in zip(batch, records, strict=True)]
            for loss_of, piece, source in pieces:
                loss, metrics = loss_of(self.editor, self.split, piece, t.c_edit, t.c_loc * w, t.c_margin * w, t.c_answer_margin,
                                          t.answer_margin_cap, **context)
                if not torch.isfinite(loss):
                    counts["nonfinite"] += 1
                    logger.warning("non-finite loss at step %d (%s); skipped", self.state.step, source)
                    continue
                self.scaler.scale(loss / (t.grad_accumulation * len(pieces))).backward()
                counts["used"] += 1 / len(pieces)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v / len(pieces)
        self.state.records_seen += self.records_per_step  # consumed even when skipped: a bad record cannot loop forever
        counts, totals = self.dist.sum(counts), self.dist.sum(totals)
        self.state.count_skipped(counts["nonfinite"], counts["too_long"], t, self.output / LAST)
        if counts["used"] == 0:
            self.state.step += 1
            return None
        params = self.editor.network_parameters + [self.editor.edit_lrs]
        self.dist.average_gradients(params)
        self.scaler.unscale_(self.opt)  # opt holds every trained tensor, α included: lr_opt steps the same unscaled gradient
        grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self._set_learning_rates()
            self.opt.step()
            if self.lr_opt:
                self.lr_opt.step()
        self.scaler.update()  # float16: halve the loss scale after an overflow, double it after 2000 clean steps
        if not finite:
            self._skip_overflow()
            return None
        metrics = {k: v / counts["used"] for k, v in totals.items()} | {"grad_norm": float(grad_norm)}
        if t.locality_target is not None:
            metrics["loc_weight"] = w  # the weight this step trained with
            self.state.follow_locality_target(metrics["locality"], t)
        return metrics

    def _objective(self, batch: MetaBatch | list[MetaBatch]):
        """The step's loss function: ``meta_loss`` (its inputs packed where ``_packs``); for batch_size > 1 (a list, one
        per record) the records' mean, each with its own edit, in one pass (``batched_meta_loss``) where the inputs
        pack and the editor sums; ``many_edits_loss`` for n_edits > 1."""
        t = self.config.training
        if t.n_edits > 1:  # one aggregated edit
            return partial(many_edits_loss, chunk=self.config.editor.chunk_edits, packed=self._packs(batch, many=True))
        if isinstance(batch, list):
            packs = self._packs(batch[0])
            if packs and self.editor.config.aggregation == "sum":
                return batched_meta_loss
            return partial(per_record_meta_loss, packed=packs)
        return partial(meta_loss, packed=self._packs(batch))

    def _packs(self, batch: MetaBatch, many: bool = False) -> bool:
        """Whether one-edit steps run their inputs as one packed row (``many``: a many-edit step its inputs as packed rows
        without padding): decided on the first batch, which must give the padded rows' loss packed too
        (``objective.packing_matches``: an architecture may ignore 4-D attention masks)."""
        if many not in self.packing:
            self.packing[many] = packing_matches(self.editor, self.split, batch, many=many)
            if self.packing[many]:
                logger.info("%s runs each step's inputs as %s (the padded rows' loss, checked on the first batch)",
                            "many-edit meta-training" if many else "meta-training", "packed rows without padding" if many else "one packed row")
            else:
                logger.warning("packed inputs do not reproduce the padded rows' loss on %s: meta-training runs padded rows",
                               type(self.split.model).__name__)
        return self.packing[many]

    def _start_step(self) -> None:
        self.editor.train()
        for opt in filter(None, self.optimizers.values()):
            opt.zero_grad(set_to_none=True)
        if self.state.records_seen < 0:
            self.state.records_seen = self.state.step * self.records_per_step

    def _micro_batch(self, micro: int) -> tuple[list[EditRecord], MetaBatch | list[MetaBatch] | None]:
        """This process's ``micro``-th micro-batch of the step (global micro-batch micro·P + rank); None if too long."""
        t = self.config.training
        start = self.state.records_seen + (micro * self.dist.world_size + self.dist.rank) * t.edits_per_call
        records = [record_at(self.data.train, t.seed, start + i) for i in range(t.edits_per_call)]
        try:
            if t.n_edits == 1 and len(records) > 1:  # batch_size > 1: one edit per record (_objective)
                return records, [self._batch([record]) for record in records]
            return records, self._batch(records)
        except PromptTooLongError as e:
            logger.warning("skipping a batch: %s", e)
            # the other processes merge their statistics of this micro-batch: once per record with one edit each
            self.dist.skip_statistics(self.editor, t.batch_size if t.n_edits == 1 else 1)
            return records, None

    def _skip_overflow(self) -> None:
        self.state.skipped_nonfinite += 1
        if self.scaler.is_enabled():
            logger.info("float16 gradient overflow at step %d: loss scale lowered to %g", self.state.step, self.scaler.get_scale())
        else:
            logger.warning("non-finite gradient norm at step %d; step skipped", self.state.step)
        self.state.step += 1

    def lr_factor(self) -> float:
        return self.state.lr_factor(self.config.training)

    def _set_learning_rates(self) -> None:
        t, factor = self.config.training, self.lr_factor()
        for opt, base in ((self.opt, t.lr), (self.lr_opt, t.lr_lr)):
            if opt is not None:
                for group in opt.param_groups:
                    group["lr"] = base * factor

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
            _, metrics = meta_loss(self.editor, self.split, batch, t.c_edit, t.c_loc, t.c_margin, t.c_answer_margin, t.answer_margin_cap,
                                   c_context=t.c_loc_context, packed=self._packs(batch), loc_scale=t.locality_scale)  # one edit per record
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
            instructions = self.data.instructions(self.data.val, self.config.data.instruction_seed)
            metrics |= validation_scores(self.model, self.tokenizer, self.editor, self.data.collator, self.data.val, instructions,
                                         t.edit_scales, t.locality_floor)
        self.log.write({"step": self.state.step, "split": "val", **metrics})
        if self.dist.is_main:
            gen = f" | generation: reliability {metrics['gen_reliability']:.3f} locality {metrics['gen_locality']:.3f}" if "gen_reliability" in metrics else ""
            logger.info("validation @%d: loss %.4f edit_acc %.3f (pre %.3f) locality %.3f%s", self.state.step, metrics["loss"], metrics["edit_acc"], metrics["edit_acc_pre"], metrics["locality"], gen)
        if self.state.record_validation(metrics, t):
            self._save_dir(BEST, with_optimizer=False, edit_scale=metrics.get("edit_scale", 1.0))
        elif self.state.stopped_early and self.dist.is_main:
            logger.info("early stopping at step %d: no validation improvement in %d validations", self.state.step, t.early_stop_patience)
        return metrics

    def _reselect_if_changed(self) -> None:
        """A resume that changes how best/ is chosen (locality_floor, edit_scales) re-selects it from the next validation on."""
        if not (changed := selection_changes(self.output, self.config)):
            return
        if self.dist.is_main:
            logger.warning("resuming %s with another selection (%s): best/ is chosen again from the next validation on",
                           self.output, ", ".join(changed))
            save_config(self.config, self.output / CONFIG)
        self.state.best_score = -math.inf

    # -- persistence ---------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        self._save_dir(LAST, with_optimizer=True)

    def _save_dir(self, name: str, with_optimizer: bool, edit_scale: float = 1.0) -> None:
        """Write the editor (its step sizes × ``edit_scale``, the generation-calibrated multiplier) into OUTPUT/name."""
        check_finite(self.editor, self.state.step, self.output / name)
        if not self.dist.is_main:  # every process holds the same editor and optimizer state
            return
        s = self.state
        extra = {"training": {"step": s.step, "best_step": s.best_step, "best_val_loss": s.best_val_loss, "edit_scale": edit_scale},
                 "queries": trained_query_setup(self.config)}
        resume = (self.optimizers, s, self.scaler) if with_optimizer else (None, None, None)
        write_checkpoint(self.output / name, self.editor, extra, edit_scale, *resume)

    def _maybe_resume(self) -> bool:
        last = self.output / LAST
        if self.dist.is_main:
            recover_interrupted(last)
        self.dist.barrier()
        found = is_resumable(last)
        self.dist.check_same(found, f"whether {last} holds a checkpoint (a multi-machine run needs --output on a shared filesystem)")
        if not found:
            return False
        check_same_data(self.output, self.data.info["file_sha256"])
        self.state = read_checkpoint(last, self.editor, self.optimizers, self.scaler)
        self.dist.check_same(self.state.step, f"the step of the checkpoint in {last}")
        if self.dist.is_main:
            self.log.truncate(self.state.step)
            logger.info("resumed from %s at step %d", last, self.state.step)
        self._reselect_if_changed()
        return True


def train(config: Config, output_dir: str | Path, show_progress: bool = True) -> dict[str, Any]:
    """Meta-train an editor as ``config`` says; returns the run summary (also in OUTPUT/summary.json)."""
    trainer = Trainer(config, output_dir, show_progress=show_progress)
    summary = trainer.run()  # ends at a barrier: every process is past its last collective
    trainer.dist.close()
    return summary
