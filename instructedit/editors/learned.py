"""What every meta-trained editor (MEND, KE) shares: its editable weights, the split model, in-place edits, save/load.

A subclass names its ``method`` (the ``editor.method`` it is trained as, and what ``editor_config.json``
records), builds its networks in ``__init__(weights, config, architecture, model_name, **dimensions)``
(``model_dimensions``: what it needs to know of the model beyond its edited weights), lists what
meta-training trains besides the step sizes in ``network_parameters``, keeps one learned step size per
weight in ``edit_lrs`` (the loop's second optimizer and the generation ``edit_scale`` multiply it),
and implements ``edit(model, batch, state) -> EditResult`` (functional: the model is not modified).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import math
import numbers
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from instructedit.config import EditorConfig, ModelConfig
from instructedit.editors.base import EditResult, WeightEditHandle, scaled_step_sizes
from instructedit.editors.rounds import HookedRounds, WrittenRounds
from instructedit.editors.hooks import Factors, capture_factors
from instructedit.io import atomic_write, write_json
from instructedit.losses import masked_nll
from instructedit.models.architectures import ArchSpec, EditableWeight, arch_spec, resolve_editable_weights, transposed_of
from instructedit.models.split import ChunkStates, PrefixState, SplitModel
from instructedit.records import TokenBatch
from instructedit.runs import EDITOR_CONFIG, EDITOR_WEIGHTS

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class UndoneRounds:
    """What ``undone_rounds_counted`` counts: the ``apply`` calls that undid a round (it raised the edits' loss)."""

    edits: int = 0

    def __str__(self) -> str:
        return f"{self.edits} edit{'s' if self.edits != 1 else ''} had a round undone (it raised the edits' loss): made in fewer rounds"


# The counts active in this thread (a context variable: another thread's edits are not counted here); the innermost
# takes what ``apply`` would otherwise warn of, one by one
_COUNTING: contextvars.ContextVar[tuple[UndoneRounds, ...]] = contextvars.ContextVar("instructedit_undone_rounds", default=())


@contextlib.contextmanager
def undone_rounds_counted() -> Iterator[UndoneRounds]:
    """Within: an ``apply`` that undoes a round counts it here (logged at DEBUG) instead of warning; for runs of many edits
    (``calibrate``, ``evaluation.cache.evaluate_resuming``), which then say how many in one line (``str`` of the count).
    Outside, each such edit warns (the API, one edit). The count is this thread's: an edit another thread makes meanwhile
    warns as usual."""
    count = UndoneRounds()
    token = _COUNTING.set((*_COUNTING.get(), count))
    try:
        yield count
    finally:
        _COUNTING.reset(token)


CONFIG_NAME, WEIGHTS_NAME = EDITOR_CONFIG, EDITOR_WEIGHTS  # the names older modules import from editors/mend.py

E = TypeVar("E", bound="LearnedEditor")


class LearnedEditor(nn.Module):
    """A trainable editor of ``weights``: the protocol meta-training, evaluation and the API use."""

    method: ClassVar[str]
    edit_lrs: nn.Parameter  # one learned step size per weight, in ``weights`` order

    def __init__(self, weights: list[EditableWeight], config: EditorConfig | None = None, architecture: ArchSpec | None = None, model_name: str = "") -> None:
        super().__init__()
        if not weights:
            raise ValueError(f"{type(self).__name__} needs at least one editable weight")
        self.config = config or EditorConfig(method=self.method)
        self.weights = list(weights)
        self.architecture = architecture
        self.model_name = model_name
        self._split_cache: tuple[int, SplitModel] | None = None

    @classmethod
    def for_model(cls: type[E], model: nn.Module, model_config: ModelConfig, editor_config: EditorConfig) -> E:
        """A fresh (untrained) editor of ``model``'s inner weights as ``model_config`` names them."""
        override = ArchSpec.from_dict(model_config.architecture) if model_config.architecture else None
        spec = arch_spec(model, override)
        weights = resolve_editable_weights(model, spec, model_config.edit_weights or None, model_config.last_n_layers)
        return cls(weights, editor_config, override, model_config.name, **cls.model_dimensions(model))

    @classmethod
    def model_dimensions(cls, model: nn.Module) -> dict[str, int]:
        """Sizes of ``model`` other than its edited weights' that the networks are built for: keyword arguments of
        ``__init__``, saved in ``editor_config.json`` as "dimensions" (none for MEND)."""
        return {}

    @property
    def dimensions(self) -> dict[str, int]:
        """This editor's ``model_dimensions``."""
        return {}

    @property
    def network_parameters(self) -> list[nn.Parameter]:
        """What meta-training's first optimizer trains besides the step sizes ``edit_lrs``."""
        raise NotImplementedError

    def edit(self, model: nn.Module | SplitModel, batch: TokenBatch, state: PrefixState | None = None) -> EditResult:
        """Edited weights from ``batch`` (its labelled tokens are the targets); the model is not modified."""
        raise NotImplementedError

    def split(self, model: nn.Module | SplitModel) -> SplitModel:
        """The model cut at the first edited block (cached per model object)."""
        if isinstance(model, SplitModel):
            return model
        if self._split_cache is None or self._split_cache[0] != id(model):
            self._check_model(model)
            spec = arch_spec(model, self.architecture)
            self._split_cache = (id(model), SplitModel(model, spec, min(w.layer for w in self.weights)))
        return self._split_cache[1]

    def _check_model(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for w in self.weights:
            if w.name not in params:
                raise ValueError(f"this editor edits {w.name!r}, which the model does not have (editor trained for {self.model_name or 'another model'})")
            stored = tuple(params[w.name].shape)
            expected = (w.shape[1], w.shape[0]) if w.transposed else w.shape
            if stored != tuple(expected):
                raise ValueError(f"weight {w.name!r} has shape {stored}, the editor expects {tuple(expected)}")

    def edit_factors(self, split: SplitModel, batch: TokenBatch, state: PrefixState | None = None) -> tuple[dict[str, Factors], torch.Tensor]:
        """One forward/backward of the edit NLL of ``batch`` (mean over its labelled tokens): the gradient factors
        (u, δ) of every edited weight, and the NLL (detached). ``state``: ``split.prefix(batch)``, if already run."""
        factors, loss, _ = self.edit_factors_and_output(split, batch, state)
        return factors, loss

    def edit_factors_and_output(self, split: SplitModel, batch: TokenBatch,
                                state: PrefixState | None = None) -> tuple[dict[str, Factors], torch.Tensor, torch.Tensor]:
        """``edit_factors`` and the final hidden states (batch, seq, d_model, detached) of the pass they were taken on:
        the model's output as it stands, which a caller that needs it then does not run again (the meta-training
        step's pre-edit logits, ``objective._packed_inputs``)."""
        mask = batch.label_mask
        if not bool(mask.any()):
            raise ValueError("the edit batch has no target tokens to learn")
        state = state if state is not None else split.prefix(batch, final=False)
        with torch.enable_grad(), capture_factors(split.model, self.weights) as capture:
            hidden = split.suffix(state)
            logits = split.logits_at(hidden, mask)
            loss = masked_nll(logits, batch.labels[mask])
            factors = capture.factors(loss)
        return factors, loss.detach(), hidden.detach()

    @torch.no_grad()
    def edits_loss(self, split: SplitModel, batch: TokenBatch, state: PrefixState | ChunkStates | None = None) -> torch.Tensor:
        """The edits' loss on the model as it stands, as an edit of ``batch`` reports it (``EditResult.pre_edit_loss``),
        without making one: one pass of the edited blocks from ``state`` (``round_state``), no backward, no network."""
        state = state if state is not None else split.prefix(batch, final=False)
        return masked_nll(split.logits_at(split.suffix(state), batch.label_mask), batch.labels[batch.label_mask])

    def round_state(self, split: SplitModel, batch: TokenBatch) -> PrefixState | ChunkStates:
        """What every round of an edit of ``batch`` starts from (``edit``'s ``state``): the unedited prefix's pass over it,
        which no round changes (the edited weights are all above it)."""
        return split.prefix(batch, final=False)

    def edited_params(self, split: SplitModel, updates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """W + ΔW per weight, added in float32 and rounded once (a bf16/fp16 weight would otherwise also round the small update)."""
        new_params = {}
        for w in self.weights:
            param = split.model.get_parameter(w.name)
            new_params[w.name] = (param.float() + updates[w.name].to(param.device)).to(param.dtype)
        return new_params

    @torch.no_grad()
    def apply(self, model: nn.Module, batch: TokenBatch, rounds: int = 1, progress: bool = False, anchored: bool = False) -> WeightEditHandle:
        """Edit ``model`` in place; the handle (also a context manager) rolls back bit-exactly.

        ``rounds`` > 1: the edit is made again on the model the earlier rounds edited, ``rounds`` edits in all, each
        from the gradients left after the earlier ones: an edit already said asks for little, one that many edits' one
        least-squares compromise shrank asks again (``analyze batch --rounds``). A round after which the edits' own
        loss is higher than before it (or not finite) is undone and the rounds stop there, with a warning (the first round
        stays: it is the one-round edit; the last one is checked by one pass of the edited blocks, ``edits_loss``): rounds
        that overshoot only grow (a preservation sample too weak for its weight took every answer to nothing). The handle
        undoes every round; ``handle.rounds_made`` says how many were kept. ``progress``: a bar over the rounds.
        The blocks below the edited ones pass over the edit inputs once (``round_state``), not once per round: no round
        changes them, so every round starts from that pass (the same weights, bit for bit, in a fraction of the time).

        ``anchored`` (least-squares editors with preserved keys): each later round's solve holds the preserved keys'
        outputs to the original weights' rather than to the last round's (``MENDEditor.anchor``), so rounds
        that each move them a little cannot add up to a large move; without preserved keys it changes nothing."""
        return self.edit_in_rounds(model, batch, rounds, progress, anchored).handle

    @torch.no_grad()
    def edit_in_rounds(self, model: nn.Module, batch: TokenBatch, rounds: int = 1, progress: bool = False,
                      anchored: bool = False, state: PrefixState | None = None, hooked: bool = False) -> WrittenRounds | HookedRounds:
        """``apply``'s rounds, and what they made (``editors.rounds``): written into the model (``WrittenRounds``: its
        handle, the tensors the model's edited weights now equal, each kept round's thin factors) or, ``hooked``, kept
        beside it (``HookedRounds``, for ``rounds_result``). ``state``: ``round_state(split, batch)``, where a caller has it."""
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        if anchored and not hasattr(self, "anchor"):
            raise ValueError(f"anchored rounds need a least-squares MEND editor; this one is {type(self).__name__}")
        anchored = anchored and self.holds_sample()  # nothing to anchor: the plain rounds
        if anchored and hooked:
            raise ValueError("anchored rounds are written into the model (hooked=False)")
        was_training = self.training
        outer = getattr(self, "anchor", None)  # a shift made before this call that its solves already answer for
        self.eval()
        try:
            with tqdm(total=rounds, desc="edit rounds", unit="round", disable=not progress or rounds == 1) as bar:
                # the blocks below the edited ones pass over the edit inputs once: every round starts from that pass
                if state is None and rounds > 1:
                    state = self.round_state(self.split(model), batch)
                result = self.edit(model, batch, state)
                made = (HookedRounds(model, result, batch.input_ids.shape[0], transposed_of(self.weights)) if hooked
                        else WrittenRounds(model, result))
                bar.update()
                try:
                    before = None  # the edits' loss before the round made last (the first round stays: it is the one-round edit)
                    unedited = float(result.pre_edit_loss)  # the edits' loss on the model as the call found it

                    def undone(after: torch.Tensor | None) -> bool:
                        """The round made last raised the edits' loss (``before`` → ``after``; anchored, where a round may
                        trade some of it for the sample's outputs: above the loss before the call, or not finite): undone."""
                        if before is None or after is None:
                            return False
                        limit = unedited if anchored else float(before)
                        if float(after) <= limit:  # NaN compares False: undone
                            return False
                        made.drop_last()
                        counting = _COUNTING.get()
                        if counting:
                            counting[-1].edits += 1
                        (logger.debug if counting else logger.warning)(
                            "edit round %d raised the edits' loss from %.4g to %.4g%s: undone, the edits are made in %d round(s) of %d",
                            made.rounds_made + 1, float(before), float(after),
                            f", above the {limit:.4g} before the call" if anchored else "", made.rounds_made, rounds)
                        return True

                    originals = made.handle.originals() if anchored else None
                    for _ in range(rounds - 1):
                        if originals is not None:  # the shift made so far (before this call too), for the next solve to answer for
                            self.anchor = {name: made.written[name].float() - originals[name].float() + (outer[name] if outer else 0)
                                           for name in originals}
                        with made.running():
                            result = self.edit(model, batch, state)
                        if undone(result.pre_edit_loss):
                            break
                        before = result.pre_edit_loss
                        made.add(result)
                        bar.update()
                    else:  # every round was made: the last one is checked too (a one-round edit has nothing to check)
                        if before is not None:
                            with made.running():
                                after = self.edits_loss(self.split(model), batch, state)
                            undone(after)
                except BaseException:
                    made.rollback()
                    raise
        finally:
            self.train(was_training)
            if anchored:
                self.anchor = outer
        return made

    # -- persistence ---------------------------------------------------------------------------
    def editor_config(self) -> dict:
        return {
            "method": self.method,
            "model_name": self.model_name,
            "editor": dataclasses.asdict(self.config),
            "weights": [dataclasses.asdict(w) for w in self.weights],
            "architecture": dataclasses.asdict(self.architecture) if self.architecture else None,
        } | ({"dimensions": self.dimensions} if self.dimensions else {})

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write ``editor_config.json`` + ``editor.safetensors`` (networks, step sizes, statistics)."""
        directory = Path(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        bad = nonfinite_tensors(tensors)
        if bad:  # a diverged editor is never written: it would only fail later, far from the cause
            raise FloatingPointError(f"not saving the editor to {directory}: {bad[:3]} hold NaN/Inf values")
        directory.mkdir(parents=True, exist_ok=True)
        config = self.editor_config() | (extra or {})
        atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
        write_json(directory / CONFIG_NAME, config)
        return directory

    @classmethod
    def from_pretrained(cls: type[E], directory: str | Path, device: str | torch.device = "cpu") -> E:
        """Load what ``save_pretrained`` wrote; a damaged folder raises one ValueError naming the folder and the file."""
        directory = Path(directory)
        data = read_editor_config(directory)
        if data.get("method") != cls.method:
            raise ValueError(f"{directory / CONFIG_NAME}: method {data.get('method')!r} is not {cls.method!r}")
        missing = [key for key in ("weights", "editor") if key not in data]
        if missing:
            raise _corrupt(directory, CONFIG_NAME, f"lacks the field(s) {missing}")
        try:
            weights = [EditableWeight(**{**w, "shape": tuple(w["shape"])}) for w in data["weights"]]
            arch = data.get("architecture")
            arch_obj = ArchSpec.from_dict(arch) if arch else None
            editor = cls(weights, EditorConfig(**data["editor"]), arch_obj, data.get("model_name", ""), **data.get("dimensions", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise _corrupt(directory, CONFIG_NAME, f"describes no valid editor ({type(e).__name__}: {e})") from None
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise _corrupt(directory, WEIGHTS_NAME, "is missing")
        try:
            state = load_file(str(weights_path), device=str(device))
        except SafetensorError as e:
            raise _corrupt(directory, WEIGHTS_NAME, f"is not a readable safetensors file ({e})") from None
        expected = editor.state_dict()
        absent, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        problems = [f"{what} tensor(s) {names[:3]}" for what, names in (("missing", absent), ("unexpected", unexpected)) if names]
        problems += [f"{k} has shape {tuple(state[k].shape)}, {CONFIG_NAME} implies {tuple(v.shape)}"
                     for k, v in expected.items() if k in state and state[k].shape != v.shape][:3]
        if problems:
            raise _corrupt(directory, WEIGHTS_NAME, f"does not match {CONFIG_NAME}: {'; '.join(problems)}")
        bad = nonfinite_tensors(state)
        if bad:
            raise _corrupt(directory, WEIGHTS_NAME, f"holds NaN/Inf values in {bad[:3]} (a diverged training run?)")
        editor.load_state_dict(state, strict=True)
        return editor.to(device)


def read_editor_config(directory: str | Path) -> dict:
    """The JSON object of ``directory/editor_config.json``; a missing or damaged file fails naming it."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved editor: {CONFIG_NAME} is missing")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise _corrupt(directory, CONFIG_NAME, f"is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _corrupt(directory, CONFIG_NAME, f"holds a JSON {type(data).__name__}, not an object")
    return data


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _corrupt(directory: Path, file: str, why: str) -> ValueError:
    return ValueError(f"{directory} holds an incomplete or corrupt editor: {directory / file} {why}; "
                      "save or download it again, or use another checkpoint")


def check_rounds(editor: Any, rounds: int) -> None:
    """Only a learned editor (MEND, KE) edits in rounds (``LearnedEditor.apply``); any other with ``rounds`` != 1 is refused."""
    if rounds != 1 and not isinstance(editor, LearnedEditor):
        raise ValueError(f"rounds={rounds}: only a learned editor (MEND, KE) edits in rounds; this one is {type(editor).__name__}")


AUTO_ROUNDS = "auto"
AUTO_AS_SINGLE = 16  # "auto": calls of up to this many edits are made as one edit is (its calibrated rounds and weight)


def check_edit_rounds(value: Any, where: str) -> int:
    """An editor's single-edit rounds (``queries.edit_rounds``, ``calibrate --rounds``): a whole number >= 1; else a
    ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{where}: edit rounds must be a whole number >= 1, got {value!r}")
    return int(value)


class Schedule(NamedTuple):
    """How a call of N edits is made (``schedule_for``): its rounds, its preservation sample's weight (None: as calibrated,
    or no sample) and the multiplier of the editor's step sizes in it (``scaled_step_sizes``)."""

    rounds: int
    sample_weight: float | None
    step_scale: float = 1.0


def check_many_edit_scale(value: Any, where: str) -> float:
    """An editor's step-size multiplier for many edits (``queries.many_edit_scale``): a finite number > 0;
    else a ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
        raise ValueError(f"{where}: the step-size multiplier of many edits must be a finite number > 0, got {value!r}")
    return float(value)


def many_edit_step_scale(editor: Any, many_edit_scale: float) -> float:
    """The step-size multiplier ``editor`` makes many edits at (more than ``AUTO_AS_SINGLE`` in one call, or kept one after
    another): ``many_edit_scale`` for a learned editor, 1 for any other (no learned step sizes to scale)."""
    return check_many_edit_scale(many_edit_scale, "many_edit_scale") if isinstance(editor, LearnedEditor) else 1.0


def schedule_for(editor: Any, n_edits: int, rounds: int | str = 1, sample_weight: float | None = None,
                 single_rounds: int = 1, many_edit_scale: float = 1.0) -> Schedule:
    """How a call of ``n_edits`` edits is made (``Schedule``): ``rounds`` and ``sample_weight`` as asked, except
    ``rounds="auto"``: for a least-squares editor with a preservation sample of its own and more than ``AUTO_AS_SINGLE``
    edits, ⌈√N / 2⌉ rounds with the sample counted as √N × its calibrated weight (``sample_weight``, if given, instead);
    otherwise ``single_rounds`` (one edit, or a few, as the editor makes one: the rounds its calibration chose,
    ``queries.edit_rounds``, 1 unless ``calibrate --rounds`` chose more; any editor but a learned one: 1, rounds were not
    measured to help it).

    The step sizes: a learned editor's × ``many_edit_scale`` (its ``queries.many_edit_scale``) in a call of more than
    ``AUTO_AS_SINGLE`` edits, whatever its rounds; as they are in a call of fewer. An editor calibrated to make single edits
    in several rounds at smaller step sizes makes many edits at its one-round calibration's step sizes, with which the
    many-edit schedules (this rule, and the rounds and weights of ``results/analysis/ls-keys/rounds/``) were measured.

    Measured on ZsRE's train split with the recommended editor (``results/analysis/ls-keys/rounds/README.md``, "auto"),
    against one round at the calibrated weight: N = 16, 2 rounds would gain nothing (the same 86.4 / 62.5 % said);
    N = 32 (3 rounds): generalization 84.4 / 53.1 against 79.7 / 46.9 at locality 98.0 / 93.8 against 96.8 / 93.8;
    N = 64 (4 rounds): reliability 91.3 / 71.9 against 83.8 / 60.9 at locality 93.8 / 92.2 against 89.6 / 90.6; N = 256
    (8 rounds): 94.8 / 78.1 against 72.6 / 34.0 at 83.4 / 83.2 against 75.9 / 82.4. Held out: N = 64, 88.8 / 60.9
    against 85.2 / 46.9 at 88.3 / 89.1 against 84.0 / 84.4; N = 256, 91.5 / 70.3 against 72.0 / 22.7 at 83.1 / 78.9
    against 76.9 / 81.6. Each round after the first costs its edited blocks' forward and backward, the network and the
    solve, not the blocks below (``apply``: one prefix pass for all rounds): 32 rounds of 256 edits, 152 s on two threads."""
    check_many_edit_scale(many_edit_scale, "many_edit_scale")
    if n_edits < 1:
        raise ValueError(f"a call needs at least one edit, got {n_edits}")
    scale = many_edit_step_scale(editor, many_edit_scale) if n_edits > AUTO_AS_SINGLE else 1.0
    if rounds != AUTO_ROUNDS:
        if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral):
            raise ValueError(f"rounds must be a whole number >= 1 or {AUTO_ROUNDS!r}, got {rounds!r}")
        return Schedule(int(rounds), sample_weight, scale)
    own = getattr(editor, "preservation", None)
    if n_edits <= AUTO_AS_SINGLE:
        return Schedule(check_edit_rounds(single_rounds, "single_rounds") if isinstance(editor, LearnedEditor) else 1, sample_weight)
    if own is None or getattr(getattr(editor, "config", None), "aggregation", None) != "least_squares":
        return Schedule(1, sample_weight, scale)
    root = math.sqrt(n_edits)
    return Schedule(math.ceil(root / 2), sample_weight if sample_weight is not None else own.text_weight * root, scale)


def check_sample_weight(editor: Any, weight: float | None) -> None:
    """A ``sample_weight`` (not None) needs a positive number and an editor with a preservation sample of its own."""
    if weight is None:
        return
    if not weight > 0 or weight == float("inf"):
        raise ValueError(f"sample_weight must be a positive number, got {weight}")
    if getattr(editor, "preservation", None) is None:
        raise ValueError("sample_weight: the editor has no preservation sample of its own (instructedit calibrate --preserve saves one)")


@contextlib.contextmanager
def sample_weighted(editor: Any, weight: float | None) -> Iterator[None]:
    """Inside the block, ``editor``'s own preservation sample counts as ``weight`` tokens in every solve (None: as calibrated;
    ``check_sample_weight``); the calibrated weight is restored on exit. Many edits in one call hold more of the model's
    other answers with a heavier sample (README, "Many edits")."""
    check_sample_weight(editor, weight)
    if weight is None:
        yield
        return
    sample = editor.preservation
    calibrated, sample.text_weight = sample.text_weight, float(weight)
    try:
        yield
    finally:
        sample.text_weight = calibrated


def apply_in_rounds(editor: Any, model: nn.Module, batch: TokenBatch, rounds: int = 1, sample_weight: float | None = None,
                    progress: bool = False, step_scale: float = 1.0) -> Any:
    """``editor.apply(model, batch)``, in ``rounds`` rounds where that is not 1 (``check_rounds``; ``progress``: a bar over
    them), with the editor's own preservation sample counted as ``sample_weight`` tokens if given (``sample_weighted``)
    and its step sizes × ``step_scale`` (``scaled_step_sizes``); returns its undo handle."""
    check_rounds(editor, rounds)
    with sample_weighted(editor, sample_weight), scaled_step_sizes(editor, step_scale):
        return editor.apply(model, batch) if rounds == 1 else editor.apply(model, batch, rounds=rounds, progress=progress)
