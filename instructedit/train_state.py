"""The meta-training loop's resumable state and the rules that move it: best/ selection, early stopping, the locality weight.

``last/trainer_state.json`` holds these fields, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from instructedit.config import TrainingConfig
from instructedit.evaluation.generation_check import selection_score

LOC_WEIGHT_RANGE = (0.01, 1000.0)  # bounds of the locality_target multiplier


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
    loc_weight: float = 1.0  # training.locality_target: multiplier of the locality terms
    loc_running: float | None = None  # running mean of the training locality the multiplier follows
    history: list[dict[str, float]] = field(default_factory=list)  # validation results

    def lr_factor(self, t: TrainingConfig) -> float:
        """The learning-rate multiplier of the step about to be taken (a function of the step alone: resume stays exact)."""
        if t.lr_schedule == "constant":
            return 1.0
        return 1.0 - (1.0 - t.lr_final_ratio) * min(self.step / max(t.max_steps - 1, 1), 1.0)

    def count_skipped(self, nonfinite: int, too_long: int, t: TrainingConfig, last: Path) -> None:
        """Book micro-batches skipped for a non-finite loss or too long an input; ``max_bad_steps`` non-finite losses stop training."""
        self.skipped_too_long += too_long
        self.skipped_nonfinite += nonfinite
        if nonfinite and self.skipped_nonfinite >= t.max_bad_steps:
            raise FloatingPointError(
                f"{self.skipped_nonfinite} non-finite losses by step {self.step} (training.max_bad_steps={t.max_bad_steps}); "
                f"stopping: lower training.lr or check the data. {last} holds the last checkpoint, if any")

    def improves(self, metrics: dict[str, float], t: TrainingConfig) -> bool:
        """Whether this validation's editor becomes best/: lowest loss, or (select_on generation) highest
        generation reliability among checkpoints at or above the generation-locality floor."""
        if t.select_on == "loss" or "gen_reliability" not in metrics:
            return metrics["loss"] < self.best_val_loss
        score = selection_score(metrics, t.locality_floor)
        if score > self.best_score:
            self.best_score = score
            return True
        return False

    def record_validation(self, metrics: dict[str, float], t: TrainingConfig) -> bool:
        """Book a validation; True if its editor becomes best/. ``early_stop_patience`` validations
        without improvement set ``stopped_early``."""
        self.history.append({"step": self.step, "split": "val", **metrics})
        if self.improves(metrics, t):
            self.best_val_loss = min(self.best_val_loss, metrics["loss"])
            self.best_step = self.step
            self.validations_since_best = 0
            return True
        self.validations_since_best += 1
        if t.early_stop_patience and self.validations_since_best >= t.early_stop_patience:
            self.stopped_early = True
        return False

    def follow_locality_target(self, locality: float, t: TrainingConfig) -> None:
        """Multiplicative update of the locality weight toward ``training.locality_target`` (a Lagrange-style constraint)."""
        running = locality if self.loc_running is None else 0.95 * self.loc_running + 0.05 * locality
        self.loc_running = running
        weight = self.loc_weight * math.exp(t.locality_target_rate * (t.locality_target - running))
        self.loc_weight = min(max(weight, LOC_WEIGHT_RANGE[0]), LOC_WEIGHT_RANGE[1])
