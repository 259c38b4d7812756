"""Typed configuration (model / data / editor / training / evaluation), loaded from YAML with overrides."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from instructedit.records import TASKS
from instructedit.runs import CONFIG as RUN_CONFIG

# The forms an edit is made in (training.edit_forms, an editor's queries.edit_forms; tasks/collate.py builds them): the
# instruction-wrapped prompt, the bare question (no instruction) and the question as a chat user turn, each with the
# target as its answer, solved together.
EDIT_FORMS = ("wrapped", "plain", "chat")
ANSWER_STOPS = ("none", "newline", "eos", "newline+turn", "newline+end")  # what an edit input's answer ends with (training.answer_stop);
# newline+turn: a newline, and in the chat form the token the chat template ends the assistant's turn with
# (Collator.turn_end_ids); newline+end: the chat form's as newline+turn, the others' a newline and EOS (the text ends)
# what the post-edit (generalization) loss reads (Collator.meta_batch): the wrapped rephrase, the wrapped edit input, or the
# rephrase and the edit prompt in more forms (the chat user turn; the bare question and the chat turn)
EDIT_LOSS_ON = ("rephrase", "edit_input", "rephrase+chat", "rephrase+plain+chat")
# the frames a record's locality question is scored in during meta-training (training.locality_frames): as it is, and in
# the edit's own instruction frame (Collator.meta_batch)
LOCALITY_FRAMES = ("raw", "wrapped")


def check_edit_forms(forms: typing.Sequence[str] | str, where: str = "edit_forms") -> tuple[str, ...]:
    """``forms`` (a sequence, or comma-separated text) as a tuple in ``EDIT_FORMS`` order; a clear error for an unknown,
    repeated or missing form."""
    if isinstance(forms, str):
        forms = [f.strip() for f in forms.split(",") if f.strip()]
    forms = list(forms)
    unknown = [f for f in forms if f not in EDIT_FORMS]
    if unknown or not forms or len(set(forms)) != len(forms):
        raise ValueError(f"{where}: {forms!r} must be distinct forms out of {list(EDIT_FORMS)}, at least one")
    return tuple(f for f in EDIT_FORMS if f in forms)


def many_edit_forms(forms: typing.Sequence[str]) -> tuple[str, ...]:
    """The forms many edits (more than 16 in one call, or kept one after another) are made in by an editor that makes a
    single edit in ``forms``: the same without "plain" (the bare question) where another form remains.

    A bare question's keys are those of every other bare question the model is asked: one edit made bare costs little,
    many shift them all. Held-out ZsRE, 64 edits in one call (generation, n = 64; said wrapped / bare / chat, then the
    unedited answers kept to 192 other questions; ``results/analysis/plain-edit-row/many-edit-forms/``): the recommended
    run calibrated for the three forms said 51.6 / 43.8 / 45.3 % and kept 29.2 % made in the three, 42.2 / 6.2 / 42.2 % and
    kept 87.5 % made in the wrapped and chat forms."""
    forms = check_edit_forms(forms)
    return tuple(f for f in forms if f != "plain") or forms


DEFAULT_MODEL = "smollm2-135m-instruct"
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # what from_pretrained(device_map=...) accepts
AGGREGATIONS = ("sum", "least_squares")  # editor.aggregation: how the edits of one call combine (editors/aggregation.py)
LS_KEYS = ("all", "answer")  # editor.ls_keys: which tokens' keys a least-squares solve fits (editors/aggregation.py)
# a preservation sample (analysis.many_edits.key_memory): its prompts' continuations (the data's answers, the unedited
# model's own, both), and which positions' keys are held still (every one, those that predict the answer)
PRESERVE_ANSWERS = ("data", "model", "both")
PRESERVE_KEYS = ("all", "answer")
LEARNED_METHODS = ("mend", "ke")  # editor.method: the editors meta-training trains (editors/registry.py LEARNED_EDITORS)


class YAMLLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float: PyYAML follows YAML 1.1, where a float needs a dot."""


YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _check(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"config field '{field_name}': {message}")


@dataclass
class ModelConfig:
    name: str = DEFAULT_MODEL  # "smollm2-135m-instruct", a local HF folder, or a hub name
    dtype: str = "float32"
    max_length: int = 128  # longest edit input (instruction + prompt + target) in tokens
    last_n_layers: int = 3  # editable MLP weights: those of the last N blocks ...
    edit_weights: list[str] = field(default_factory=list)  # ... unless named here explicitly
    architecture: dict[str, Any] | None = None  # {layers, final_norm, mlp_modules} for unknown model types
    device_map: str | dict[str, Any] | None = None  # "auto" etc.: spread the frozen base over this process's GPUs

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must name a model (e.g. smollm2-135m-instruct)")
        if isinstance(self.device_map, str):
            ok = self.device_map in DEVICE_MAP_STRATEGIES or re.fullmatch(r"cpu|cuda(:\d+)?", self.device_map) is not None
            _check(ok, "model.device_map", f"{self.device_map!r} is not one of {list(DEVICE_MAP_STRATEGIES)}, a device, a mapping or null")
        _check(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"{self.dtype!r} is not one of float32, bfloat16, float16")
        _check(self.max_length >= 8, "model.max_length", f"{self.max_length} is too small (>= 8)")
        _check(self.last_n_layers >= 1, "model.last_n_layers", "must be >= 1")
        if self.architecture is not None:
            missing = {"layers", "final_norm", "mlp_modules"} - set(self.architecture)
            _check(not missing, "model.architecture", f"missing keys {sorted(missing)}")


@dataclass
class DataConfig:
    data_dir: str | None = None  # default: $INSTRUCTEDIT_DATA, else ../shared/data beside the repo
    tasks: list[str] = field(default_factory=lambda: ["counterfact", "wikirecent", "convsent"])
    instructions: bool = True  # False: multi-task / single-task MEND without instructions
    instruction_pool: str | None = None  # a pool JSON file; None: the project's own descriptions
    instruction_seed: int = 0  # picks one seen description per training record
    # The instruction template (slots {task}, {description}, {prompt}); None: DESIGN.md §2's, where the answer
    # follows the prompt directly. An answer prefix ("...Input: {prompt}\nOutput:") puts the answer where the
    # model itself continues the template.
    template: str | None = None
    split_seed: int = 0
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    balance: bool = True  # cap ConvSent at the size of the largest other task (the paper's balancing)
    max_per_task: int | None = None
    oversample: dict[str, float] = field(default_factory=dict)  # task -> repeat its training records this many times (e.g. {convsent: 4})
    # Train on a held-out task (ZsRE): only a single-task editor without instructions may (Table 1's transfer matrix);
    # InstructEdit and multi-task editors never see it, so their ZsRE scores stay a transfer test.
    allow_held_out: bool = False

    def __post_init__(self) -> None:
        _check(len(self.tasks) > 0, "data.tasks", "needs at least one task")
        for t in self.tasks:
            _check(t in TASKS, "data.tasks", f"unknown task {t!r}; valid tasks: {list(TASKS)}")
        _check(len(self.split_fractions) == 3 and all(f > 0 for f in self.split_fractions), "data.split_fractions", "needs three positive fractions (train, val, test)")
        _check(abs(sum(self.split_fractions) - 1.0) < 1e-6, "data.split_fractions", f"{self.split_fractions} must sum to 1")
        _check(self.max_per_task is None or self.max_per_task > 0, "data.max_per_task", "must be positive or null")
        for task, factor in self.oversample.items():
            _check(task in self.tasks, "data.oversample", f"{task!r} is not one of data.tasks {self.tasks}")
            ok = isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor) and factor > 0
            _check(ok, "data.oversample", f"the factor of {task!r} must be a positive number, got {factor!r}")
        _check(not self.allow_held_out or (len(self.tasks) == 1 and not self.instructions), "data.allow_held_out",
               f"only a single-task editor without instructions may train on a held-out task (tasks {self.tasks}, instructions "
               f"{self.instructions}); InstructEdit and multi-task editors keep the held-out task unseen: set it to false")
        if self.template is not None:
            missing = [slot for slot in ("{task}", "{description}", "{prompt}") if slot not in self.template]
            _check(not missing, "data.template", f"lacks the slot(s) {missing}")


@dataclass
class EditorConfig:
    method: str = "mend"
    rank: int = 1920  # low-rank width of the MEND layers: min(rank, d_in + d_out)
    n_hidden: int = 1  # residual layers = n_hidden + 1
    init_edit_lr: float = 1e-4  # initial learned step size α per inner weight
    eps: float = 1e-7  # added to the running std
    # How the per-token updates of the edits in one call combine (DESIGN.md §9): "sum" (MEND, the paper) or
    # "least_squares" (MALMEN: one ridge-regression shift per weight, with a learned λ per weight).
    aggregation: str = "sum"
    chunk_edits: int = 64  # least_squares: edit inputs per forward/backward while accumulating KᵀK and KᵀD
    # least_squares: the tokens whose keys and value changes the solve fits. "all": every token with a gradient (the
    # edit input's prompt too, the instruction template included); "answer": only the positions that predict answer
    # tokens, so that many edits in one call do not compete over the keys their prompts share (editors/aggregation.py).
    ls_keys: str = "all"
    # KE (editors/ke.py): BiLSTM width per direction over the edit's token embeddings, width of the edit
    # encoding, and hidden width of each edited weight's conditioner (De Cao et al. 2021 use 256, 1024, 128).
    lstm_dim: int = 256
    condition_dim: int = 1024
    conditioner_dim: int = 128

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "editor.rank", "must be >= 1")
        _check(self.aggregation in AGGREGATIONS, "editor.aggregation", f"{self.aggregation!r} is not one of {list(AGGREGATIONS)}")
        _check(self.chunk_edits >= 1, "editor.chunk_edits", f"{self.chunk_edits}: must be >= 1")
        _check(self.ls_keys in LS_KEYS, "editor.ls_keys", f"{self.ls_keys!r} is not one of {list(LS_KEYS)}")
        _check(self.n_hidden >= 0, "editor.n_hidden", "must be >= 0")
        _check(self.init_edit_lr > 0, "editor.init_edit_lr", "must be > 0")
        for name in ("lstm_dim", "condition_dim", "conditioner_dim"):
            _check(getattr(self, name) >= 1, f"editor.{name}", f"{getattr(self, name)}: must be >= 1")
        _check(self.method == "mend" or self.aggregation == "sum", "editor.aggregation",
               f"{self.aggregation!r} is implemented for MEND only; editor.method {self.method!r} sums its edits' updates: use 'sum'")
        _check(self.method in LEARNED_METHODS, "editor.method", f"{self.method!r}: training meta-trains learned editors only, so it must be "
               f"one of {list(LEARNED_METHODS)}; the baselines (ft, grace, calinet) need no training: run `instructedit evaluate --method NAME`")


@dataclass
class TrainingConfig:
    lr: float = 1e-6  # Adam on the MEND network and α
    lr_lr: float = 1e-4  # second Adam on α only
    lr_schedule: str = "constant"  # or "linear": both learning rates fall linearly to lr_final_ratio × at max_steps
    lr_final_ratio: float = 0.1
    c_edit: float = 0.1
    c_loc: float = 1.0
    c_margin: float = 0.0  # optional hinge keeping the locality inputs' top-1 answers ahead (objective.py); 0 = DESIGN.md §4
    # Optional locality KL on the locality input's prompt positions too (objective.py), not only on its answer tokens:
    # an edit must not change how the model continues unrelated text anywhere (e.g. the target after a question); 0 = DESIGN.md §4
    c_loc_context: float = 0.0
    # The multiple of the update the locality terms are scored at (objective.py): an editor used at a multiple of its
    # learned step sizes (edit_scales) learns to keep unrelated inputs at that strength; 1 = DESIGN.md §4. Tried on the
    # generation recipe (2, 3): the locality weight climbs and the edits shrink (results/recommended-zsre-smollm2/locality-scale/)
    locality_scale: float = 1.0
    # Optional locality constraint: the locality terms' weight w (c_loc·w, c_margin·w) rises while a running
    # mean of the training locality is under this target and falls while it is over (w ← w·exp(rate·gap)).
    locality_target: float | None = None
    locality_target_rate: float = 0.2
    # Records per micro-batch, each with its own edit (as grad_accumulation would take them: the learning curve per
    # record is that of batch_size 1 with grad_accumulation × as many), run as one row (objective.batched_meta_loss)
    batch_size: int = 1
    # Edits per aggregated edit in a micro-batch (DESIGN.md §9): n_edits > 1 trains on N records edited in one call
    # (objective.many_edits_loss) and takes the place of batch_size, which must then be 1.
    n_edits: int = 1
    grad_accumulation: int = 2
    grad_clip: float = 100.0
    max_steps: int = 30000  # optimizer steps
    edit_loss_on: str = "rephrase"  # "rephrase" (MEND paper; falls back to the edit input), "edit_input", "rephrase+chat", "rephrase+plain+chat"
    # The frames each record's locality question is scored in (LOCALITY_FRAMES): "raw" (DESIGN.md §4: the question
    # as it is) and "wrapped" (the same question in the edit's own instruction frame, where a user of the editor asks:
    # the in-frame locality of results/analysis/in-frame-locality/, kept by the locality KL during meta-training too).
    # Tried on the recommended recipe (run K there): after calibration with a preservation sample, no more in-frame or raw
    # locality at the same said than without it; calibrate --in-frame-preserve is what holds the frame still
    locality_frames: list[str] = field(default_factory=lambda: ["raw"])
    # Generation (DESIGN.md §5): what an edit input's answer ends with ("newline"/"eos" teach the edited model
    # to stop after the answer; "newline+turn" ends the chat form's answer with the end of the assistant's turn, so a chat
    # answer closes its turn instead of going on line after line; "newline+end" also ends the wrapped and bare answers'
    # text, a newline and EOS, so that the edited model stops there instead of repeating the answer), and a hinge that keeps every answer token (and the stop) ahead of the best
    # other token by answer_margin_cap logits: the condition for greedy decoding to say the answer.
    answer_stop: str = "none"
    # The forms each edit is made in, solved together (collate.EDIT_FORMS): the instruction-wrapped prompt, the bare
    # question (no instruction: the edit also comes out when the question is asked as it is) and the question as a chat
    # user turn (a tokenizer with a chat template: ... when the model is asked as a chat assistant;
    # results/analysis/chat-edit-row/, results/analysis/plain-edit-row/). Saved with the editor (queries.edit_forms).
    edit_forms: list[str] = field(default_factory=lambda: ["wrapped"])
    c_answer_margin: float = 0.0
    answer_margin_cap: float = 2.0
    # Validation by generation: greedy answers of the edited model (reliability: exact match on the wrapped edit
    # prompt; locality: unchanged answers). select_on "generation" keeps as best/ the checkpoint with the highest
    # generation reliability among those whose generation locality is >= locality_floor (else the highest locality).
    val_generation: bool = False
    select_on: str = "loss"
    locality_floor: float = 0.9
    # Multipliers of the learned step sizes α tried at each generation validation; best/ is saved with the one that
    # validates best (the meta-objective is teacher-forced and can leave α too small for greedy decoding).
    edit_scales: list[float] = field(default_factory=lambda: [1.0])
    val_every: int = 500  # steps between validations; 0: none at all, best/ is the final editor (one edit_scales value)
    val_size: int = 200
    validate_at_start: bool = True  # a validation of the untrained editor at step 0 (the baseline; false: the first one at val_every)
    early_stop_patience: int = 10  # validations without improvement before stopping; 0 disables
    log_every: int = 10
    checkpoint_every: int = 500
    seed: int = 0
    device: str = "auto"
    tensorboard: bool = False
    max_bad_steps: int = 50  # consecutive NaN/Inf losses before training gives up
    activation_checkpointing: bool = False  # recompute the edited blocks in backward instead of keeping their activations

    def __post_init__(self) -> None:
        _check(math.isfinite(self.lr) and self.lr > 0, "training.lr", f"{self.lr}: must be positive and finite (e.g. 1e-6)")
        _check(math.isfinite(self.lr_lr) and self.lr_lr >= 0, "training.lr_lr", f"{self.lr_lr}: must be finite and >= 0 (0: no second optimizer on α)")
        _check(self.grad_clip > 0, "training.grad_clip", f"{self.grad_clip}: the largest gradient norm must be > 0 (.inf: no clipping)")
        for name in ("c_edit", "c_loc", "c_margin", "c_answer_margin", "c_loc_context"):
            _check(getattr(self, name) >= 0, f"training.{name}", "loss coefficients must be >= 0")
        _check(self.locality_target is None or 0 < self.locality_target <= 1, "training.locality_target", "must be in (0, 1] or null")
        _check(self.locality_target_rate > 0, "training.locality_target_rate", "must be > 0")
        _check(self.lr_schedule in ("constant", "linear"), "training.lr_schedule", f"{self.lr_schedule!r} is not 'constant' or 'linear'")
        _check(0 <= self.lr_final_ratio <= 1, "training.lr_final_ratio", "must be in [0, 1]")
        _check(self.batch_size >= 1, "training.batch_size", "must be >= 1")
        _check(self.n_edits >= 1, "training.n_edits", f"{self.n_edits}: must be >= 1")
        _check(self.n_edits == 1 or self.batch_size == 1, "training.n_edits",
               f"{self.n_edits} edits per call already make the micro-batch: set training.batch_size to 1 (it is {self.batch_size})")
        _check(self.n_edits == 1 or self.c_loc_context == 0, "training.c_loc_context",
               f"is implemented for one edit per call (objective.meta_loss); with n_edits={self.n_edits} set it to 0")
        _check(math.isfinite(self.locality_scale) and self.locality_scale > 0, "training.locality_scale", f"{self.locality_scale}: must be positive")
        _check(self.n_edits == 1 or self.locality_scale == 1, "training.locality_scale",
               f"is implemented for one edit per call (objective.meta_loss); with n_edits={self.n_edits} set it to 1")
        _check(self.grad_accumulation >= 1, "training.grad_accumulation", "must be >= 1")
        _check(self.max_steps >= 1, "training.max_steps", "must be >= 1")
        _check(self.edit_loss_on in EDIT_LOSS_ON, "training.edit_loss_on", f"{self.edit_loss_on!r} is not one of {list(EDIT_LOSS_ON)}")
        _check(isinstance(self.locality_frames, list) and bool(self.locality_frames) and len(set(self.locality_frames)) == len(self.locality_frames)
               and set(self.locality_frames) <= set(LOCALITY_FRAMES), "training.locality_frames",
               f"{self.locality_frames!r} must be distinct frames out of {list(LOCALITY_FRAMES)}")
        _check(self.answer_stop in ANSWER_STOPS, "training.answer_stop", f"{self.answer_stop!r} is not one of {list(ANSWER_STOPS)}")
        try:
            forms_ok = isinstance(self.edit_forms, list) and bool(check_edit_forms(self.edit_forms))
        except ValueError:
            forms_ok = False
        _check(forms_ok, "training.edit_forms", f"{self.edit_forms!r} must be distinct forms out of {list(EDIT_FORMS)}")
        _check(self.answer_margin_cap > 0, "training.answer_margin_cap", "must be > 0")
        _check(self.select_on in ("loss", "generation"), "training.select_on", f"{self.select_on!r} is not 'loss' or 'generation'")
        _check(0 <= self.locality_floor <= 1, "training.locality_floor", "must be in [0, 1]")
        _check(len(self.edit_scales) > 0 and all(s > 0 for s in self.edit_scales), "training.edit_scales", "needs positive multipliers (e.g. [1.0])")
        _check(self.val_size >= 1, "training.val_size", f"{self.val_size}: validation needs at least 1 record")
        _check(self.val_every >= 0, "training.val_every", f"{self.val_every}: must be >= 1, or 0 for no validation")
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "training.checkpoint_every", "intervals must be >= 1")
        if self.val_every == 0:  # nothing validated: nothing to choose best/ or a step-size multiplier from
            _check(not self.validate_at_start, "training.validate_at_start", "must be false with val_every: 0 (no validation)")
            _check(len(self.edit_scales) == 1, "training.edit_scales",
                   f"{self.edit_scales}: without validation (val_every: 0) no multiplier can be chosen; give one")

    @property
    def edits_per_call(self) -> int:
        """Records in one micro-batch, all edited by one (aggregated) edit: batch_size, or n_edits."""
        return self.batch_size * self.n_edits


@dataclass
class EvaluationConfig:
    instruction: str = "seen"  # "seen" (description 0), "unseen" (the held-out one) or an index
    limit: int | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        ok = self.instruction in ("seen", "unseen") or str(self.instruction).isdigit()
        _check(ok, "evaluation.instruction", f"{self.instruction!r} is not 'seen', 'unseen' or a description index")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    editor: EditorConfig = field(default_factory=EditorConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config section '{where}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{where}.{k}' if where else k for k in unknown]}; valid keys: {sorted(known)}")
    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        name = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, name)
        else:
            kwargs[key] = _coerce(value, hint, name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check a YAML value against its annotation; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args or hint is Any:
            return None
        raise ValueError(f"config field '{name}' may not be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if hint is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"config field '{name}' must be a list, got {value!r}")
        return [_coerce(v, args[0], name) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config field '{name}' must be a mapping, got {value!r}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"config field '{name}' must be a number, got {value!r}") from None
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"config field '{name}' must be {hint.__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], YAML-parsed value)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.load(raw, Loader=YAMLLoader) if raw.strip() else ""


def config_from_dict(values: dict[str, Any], overrides: list[str] | None = None) -> Config:
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in (values or {}).items()}
    for text in overrides or []:
        path, value = parse_override(text)
        if len(path) != 2:
            raise ValueError(f"override {text!r} must name section.key (e.g. training.lr=1e-5)")
        values.setdefault(path[0], {})
        if not isinstance(values[path[0]], dict):
            raise ValueError(f"override {text!r}: '{path[0]}' is not a config section")
        values[path[0]][path[1]] = value
    return _build(Config, values, "")


def read_yaml_mapping(path: str | Path, what: str, shape: str = "a mapping") -> dict[str, Any]:
    """The mapping a YAML file holds (numbers like ``1e-5`` read as floats); errors name ``what`` and the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        values = yaml.load(path.read_text(), Loader=YAMLLoader) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold {shape}")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    values = read_yaml_mapping(path, "config file", "a mapping of sections") if path is not None else {}
    try:
        return config_from_dict(values, overrides)
    except ValueError as e:
        where = f"{path}: " if path is not None else ""
        raise ValueError(f"{where}{e}") from None


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# What may differ between a run folder's saved config and the config that resumes it: the budget and
# patience, checkpoint cadence, placement and logging. Everything else changes what is trained.
SELECTION_FIELDS = ("locality_floor", "edit_scales")  # how best/ is chosen; greedy validation leaves the training path unchanged
RESUMABLE_CHANGES = {"training": ("max_steps", "early_stop_patience", "checkpoint_every", "device", "tensorboard", "log_every",
                                  *SELECTION_FIELDS)}


def selection_changes(run_dir: str | Path, config: Config) -> list[str]:
    """The ``SELECTION_FIELDS`` (how best/ is chosen) in which ``config`` differs from ``run_dir``'s saved config, as "key old -> new"."""
    saved = read_yaml_mapping(Path(run_dir) / RUN_CONFIG, "run config").get("training", {})
    current = config.to_dict()["training"]
    return [f"{k} {saved[k]} -> {current[k]}" for k in SELECTION_FIELDS if k in saved and json.dumps(saved[k]) != json.dumps(current[k])]


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Fields set in both configs that differ, ignoring what may change between resumes (and fields one
    version of the code does not know)."""
    diffs = []
    for section, values in current.items():
        old = saved.get(section)
        if not isinstance(values, dict) or not isinstance(old, dict):
            continue
        for key, value in values.items():
            if key in old and key not in RESUMABLE_CHANGES.get(section, ()) and json.dumps(old[key]) != json.dumps(value):
                diffs.append(f"{section}.{key}: {old[key]!r} there, {value!r} now")
    return diffs


def check_resumable(config: Config, run_dir: str | Path) -> None:
    """Raise ValueError if ``run_dir`` holds a run trained with a different configuration than ``config``."""
    saved_path = Path(run_dir) / RUN_CONFIG
    if not saved_path.is_file():
        return
    saved = yaml.load(saved_path.read_text(), Loader=YAMLLoader) or {}
    diffs = config_differences(saved, config.to_dict())
    if diffs:
        raise ValueError(f"{run_dir} holds a run with a different configuration ({'; '.join(diffs[:3])}); "
                         "use another --output folder or delete that run")


def env_switch(name: str) -> bool | None:
    """An on/off switch in the environment: ``$name`` "1" True, "0" False, unset or empty None; any other value raises."""
    value = os.environ.get(name, "").strip()
    if value in ("0", "1"):
        return value == "1"
    if value:
        raise ValueError(f"${name} must be 0 or 1, got {value!r}")
    return None
