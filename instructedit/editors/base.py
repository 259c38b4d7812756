"""The editor protocol, what editors return, and in-place edits with exact rollback.

Every editor (MEND, FT-L, GRACE, CaliNet, ...) implements ``apply(model, batch) -> EditHandle``:
the model is edited in place and the handle restores it exactly (``rollback()``, or leaving the
``with`` block), unless ``keep()`` makes the edit permanent. Weight editors return a
``WeightEditHandle``; editors that add modules or hooks subclass ``EditHandle``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from instructedit.editors.aggregation import remembering
from instructedit.records import TokenBatch

if TYPE_CHECKING:
    from instructedit.editors.aggregation import KeyMemory
    from instructedit.models.architectures import EditableWeight
    from instructedit.models.split import PrefixState, SplitModel

logger = logging.getLogger(__name__)

# A kept edit of a sequence may move a weight by at most this many times the median change of the edits kept before it
# (``OutlierEdits``). In a lifelong run of the recommended editor with a key memory on held-out ZsRE, edits 251-403 each
# moved their most-moved weight by 0.2-15 % of its norm (median 1.9 %); edit 404 asked for 4,280 % (an outlier
# activation of the model 403 edits had left: a key ~2,000 long against the usual tens) and took the held-out
# perplexity from x1.94 to x10^15 (``results/analysis/sequential-1000-recommended-memory``). Relative, not absolute: a
# tiny random model's edits move its weights by 10-20× their norm, every one of them.
OUTLIER_FACTOR = 50.0
OUTLIER_HISTORY = 8  # kept edits before the median is trusted
# ... and with same-relation neighbours held by every edit (``editors.neighbours``). In such sequences of 64 CounterFact
# edits (relations that repeat with conflicting targets) one edit moved a weight 13.5× the median and the model broke (0 %
# of the edits said after the 64th), or 8.1× (35.9 % said, 45.3 with it refused); every other edit of 16 such 64-edit
# sequences (CounterFact and ZsRE, with and without neighbours or a key memory) moved at most 4.9× the median of the
# edits before it (``results/analysis/in-frame-locality/sequential/neighbours/rerun/``).
NEIGHBOUR_OUTLIER_FACTOR = 6.0
AUTO_OUTLIER_FACTOR = "auto"  # NEIGHBOUR_OUTLIER_FACTOR with neighbours, else OUTLIER_FACTOR


def outlier_factor_for(factor: float | str | None, neighbours: bool) -> float | None:
    """The factor a sequence refuses an edit by (``OutlierEdits``; None: none): ``factor``, or for "auto" the default for a
    sequence with (``neighbours``) or without same-relation neighbours held by its edits."""
    if factor == AUTO_OUTLIER_FACTOR:
        return NEIGHBOUR_OUTLIER_FACTOR if neighbours else OUTLIER_FACTOR
    if isinstance(factor, str):
        raise ValueError(f"outlier_factor must be a number > 1, None or {AUTO_OUTLIER_FACTOR!r}, got {factor!r}")
    return factor

# what one edit of a sequence held still beside its key memory: given that memory (None: none), the block its solve ran in
Hold = Callable[["KeyMemory | None"], contextlib.AbstractContextManager]


@dataclass
class EditResult:
    """Edited weights, to be used functionally (``torch.func.functional_call``) or applied in place.

    ``new_params`` maps full parameter names to the edited tensors (the base weights are not touched; an edit made
    without gradients forms each only where read: ``ThinParams``); ``updates`` holds the added deltas; ``pre_edit_loss``
    is the edit NLL before the edit; ``low_rank`` the deltas as factors (adding a row's update by hooks then costs a
    fraction of a dense product: ``row_edits``).
    """

    new_params: Mapping[str, torch.Tensor]
    updates: Mapping[str, torch.Tensor] = field(default_factory=dict)
    pre_edit_loss: torch.Tensor | None = None
    # the same deltas as low-rank factors, when the editor has them (MEND's summed update: rank <= edit tokens):
    # name -> (left (d_in, r), right (r, d_out)), x · left · right = x · ΔW in either storage orientation
    low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


class _FormedWhereRead(Mapping[str, torch.Tensor]):
    """A dense tensor per edited weight from ΔW's thin factors, each formed (``_form``) the first time it is read."""

    def __init__(self, low_rank: Mapping[str, tuple[torch.Tensor, torch.Tensor]], transposed: Mapping[str, bool]) -> None:
        self.low_rank, self.transposed = low_rank, transposed
        self._formed: dict[str, torch.Tensor] = {}

    def _form(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._formed:
            self._formed[name] = self._form(name)
        return self._formed[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.low_rank)

    def __len__(self) -> int:
        return len(self.low_rank)


class ThinUpdates(_FormedWhereRead):
    """Dense updates ΔW (storage orientation) of thin factors, each formed the first time it is read.

    An edit without gradients keeps its update as the factors (and its edited weights W + ΔW unformed: ``ThinParams``);
    the dense ΔW (9 × 3.5 MB on the default model) is read only by callers that want it (a dense hook, an analysis),
    not formed for every edit.
    """

    def _form(self, name: str) -> torch.Tensor:
        left, right = self.low_rank[name]  # x · left · right = x · ΔW in Conv1D orientation (d_in, d_out)
        return left @ right if self.transposed[name] else right.T @ left.T


def thin_edited(param: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor], transposed: bool) -> torch.Tensor:
    """W + ΔW from ΔW's thin factors in one ``addmm`` (float32, rounded once to the weight's dtype): no dense ΔW is
    formed and W is read once (1.4 against 0.2 ms per 1536 × 576 weight at rank 4, two threads)."""
    left, right = (f.to(param.device) for f in factors)
    base = param.float()
    out = torch.addmm(base, left, right) if transposed else torch.addmm(base, right.T, left.T)
    return out.to(param.dtype)


class ThinParams(_FormedWhereRead):
    """W + ΔW per edited weight from ΔW's thin factors (``thin_edited``), each formed the first time it is read.

    An edit's product is its update; the edited weights are a third copy of them that only some callers need: writing
    the edit into the model (``apply``) reads them, a functional pass of a float32 model adds x · left · right by hooks
    instead (``evaluation.packing.score_functional``, as meta-training and generation do). Forming all nine on the
    default model (a copy of W and a product each) cost ~14 ms of a one-record edit's ~155 ms (one thread, 2026-12-06).
    Each value is formed from the weight as it was when the edit was made: reading one after the model's weight has
    been written to raises instead of forming it from the new weight.
    """

    def __init__(self, model: nn.Module, low_rank: Mapping[str, tuple[torch.Tensor, torch.Tensor]], transposed: Mapping[str, bool]) -> None:
        super().__init__(low_rank, transposed)
        self._params = {name: model.get_parameter(name) for name in low_rank}
        self._versions = {name: param._version for name, param in self._params.items()}

    def _form(self, name: str) -> torch.Tensor:
        param = self._params[name]
        if param._version != self._versions[name]:
            raise RuntimeError(f"the model's weight {name} was written to after this edit was made: its edited value "
                               "(W + ΔW) can no longer be formed; read EditResult.new_params before changing the model")
        return thin_edited(param.detach(), self.low_rank[name], self.transposed[name])


class EditHandle:
    """An edit applied to a model. Subclasses implement ``_restore``; the rest is shared."""

    def __init__(self) -> None:
        self._active = True

    @property
    def active(self) -> bool:
        return self._active

    def _restore(self) -> None:
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop what ``_restore`` would need (the edit becomes permanent)."""

    def rollback(self) -> None:
        """Undo the edit exactly; a second call does nothing."""
        if self._active:
            self._restore()
            self._active = False

    def keep(self) -> None:
        """Make the edit permanent: exiting the context no longer restores the model."""
        self._forget()
        self._active = False

    def __enter__(self) -> "EditHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.rollback()


class WeightEditHandle(EditHandle):
    """Edited weights written into a model; rollback copies the originals back bit for bit. ``rounds_made``: how many
    rounds of edits they hold (``LearnedEditor.apply(rounds=...)``)."""

    def __init__(self, model: nn.Module, result: EditResult) -> None:
        super().__init__()
        self.model = model
        self.rounds_made = 1
        self._originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, value in result.new_params.items():
                param = model.get_parameter(name)
                self._originals[name] = param.detach().clone()
                param.copy_(value.detach().to(param.dtype))

    def _restore(self) -> None:
        write_weights(self.model, self._originals)

    def _forget(self) -> None:
        self._originals.clear()

    def originals(self) -> dict[str, torch.Tensor]:
        """The pre-edit copies of the weights this edit wrote (read only: rollback restores from them)."""
        return dict(self._originals)

    def take_originals(self) -> dict[str, torch.Tensor]:
        """Hand over the pre-edit copies and make the edit permanent: the caller now owns its undo."""
        originals = dict(self._originals)
        self.keep()
        return originals


def write_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (parameter name -> value) into ``model``'s parameters, in their dtype."""
    with torch.no_grad():
        for name, value in tensors.items():
            model.get_parameter(name).copy_(value)


def tensor_digest(tensor: torch.Tensor) -> int:
    """CRC-32 of the tensor's bytes: catches any changed bit, at twice the speed of SHA-1."""
    flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    return zlib.crc32(flat.cpu().numpy())


def largest_change(handle: WeightEditHandle) -> tuple[str, float]:
    """The weight ``handle``'s edit moved most and by how much: (name, ‖W_after − W_before‖ / ‖W_before‖), inf for a weight
    that is no longer finite ("", 0.0 for an edit that wrote nothing)."""
    worst = ("", 0.0)
    with torch.no_grad():
        for name, before in handle.originals().items():
            before = before.float()
            after = handle.model.get_parameter(name).detach().float()
            change = float((after - before).norm() / before.norm().clamp_min(torch.finfo(torch.float32).tiny))
            change = change if math.isfinite(change) else math.inf
            if change > worst[1]:
                worst = (name, change)
    return worst


class OutlierEdits:
    """Tells an edit of a sequence that would wreck the model: one that moves a weight by more than ``factor`` times the
    median change (``largest_change``) of the edits kept so far (once ``OUTLIER_HISTORY`` are), or makes one not finite."""

    def __init__(self, factor: float = OUTLIER_FACTOR) -> None:
        if not factor > 1:
            raise ValueError(f"the outlier factor must be > 1, got {factor}")
        self.factor = float(factor)
        self.changes: list[float] = []

    def limit(self) -> float:
        """The largest change the next edit may make (inf until ``OUTLIER_HISTORY`` edits were kept)."""
        if len(self.changes) < OUTLIER_HISTORY:
            return math.inf
        ordered = sorted(self.changes)
        return self.factor * ordered[len(ordered) // 2]

    def admits(self, change: float) -> bool:
        return math.isfinite(change) and change <= self.limit()


def refuse_outlier(handle: EditHandle, outliers: OutlierEdits | None, where: str = "", memory: KeyMemory | None = None,
                   change: tuple[str, float] | None = None) -> bool:
    """Whether ``outliers`` refuses ``handle``'s edit (a weight edit only; not kept yet): then it is undone, with a warning
    naming the weight (``where``: which edit it was), and its keys leave ``memory`` (``KeyMemory.forget_last``: they are not
    in the model, so later solves need not hold them). An admitted edit's change joins ``outliers``' history.
    ``change``: the edit's ``largest_change``, where the caller has it already."""
    if not isinstance(handle, WeightEditHandle) or outliers is None:
        return False
    name, change = change or largest_change(handle)
    if outliers.admits(change):
        outliers.changes.append(change)
        return False
    handle.rollback()
    why = (f"more than {outliers.factor:g}× the median {outliers.limit() / outliers.factor:.3g} of the {len(outliers.changes)} "
           f"edits kept before it" if math.isfinite(change) else "to values that are not finite")
    logger.warning("%sthe edit would move %s by %.3g of its norm, %s: not kept, the model is as it was",
                   f"{where}: " if where else "", name, change, why)
    if memory is not None:
        memory.forget_last()
    return True


def keep_in_sequence(weights: SequentialWeightEdits, handles: list[EditHandle], handle: EditHandle, batch: TokenBatch,
                     outliers: OutlierEdits | None = None, where: str = "", memory: KeyMemory | None = None,
                     hold: Hold | None = None) -> bool:
    """Keep one more edit of a sequence: a weight edit joins ``weights`` (one copy of the originals for the whole
    sequence, not one per edit) unless hook edits came first; any other edit keeps its own undo handle in ``handles``.

    With ``outliers``, a weight edit it does not admit is undone instead (``refuse_outlier``) and False returned: a model
    that many edits have changed can make the editor ask for an update that wrecks it (``OUTLIER_FACTOR``), and every edit
    after it would be made on the wreck. ``memory``: the key memory the edit's solve remembered its keys in; ``hold``:
    what else its solve held still (``SequentialWeightEdits.add``)."""
    if refuse_outlier(handle, outliers, where, memory):
        return False
    if isinstance(handle, WeightEditHandle) and not handles:
        weights.add(handle, batch, hold)
    else:
        handles.append(handle)
    return True


class SequentialWeightEdits(EditHandle):
    """Weight edits kept one after another, undone bit for bit all at once or back to any earlier edit.

    What a kept edit costs: the sequence holds ONE copy of each edited weight, taken before the first
    edit that wrote it, plus per edit its edit batch (token ids) and a CRC-32 per written weight:
    kilobytes per edit, not a copy of the edited weights. ``rollback_to(k)`` writes the originals back
    and re-applies the first ``k`` edits with the editor (``k`` edit computations: float addition is
    not invertible, so later updates cannot be subtracted), checking each re-applied weight against
    the CRC-32 recorded when the edit was first made, at the step sizes × ``step_scale`` the edits were made at (a learned
    editor's many-edit multiplier, ``scaled_step_sizes``) and, for edits made with a key memory (``memory``), holding
    what they held: the memory as the sequence found it, plus the keys of the kept edits before each (a copy; the
    caller's memory is left as the sequence left it, by this as by ``rollback``).
    """

    def __init__(self, model: nn.Module, editor: Editor, step_scale: float = 1.0, memory: KeyMemory | None = None,
                 rounds: int = 1) -> None:
        super().__init__()
        self.model, self.editor, self.step_scale, self.rounds = model, editor, step_scale, rounds
        # the memory's sums are replaced, never written in place: references keep its state as the sequence found it
        self._memory, self._memory_start = memory, (dict(memory.past), memory.calls) if memory is not None else None
        self._originals: dict[str, torch.Tensor] = {}
        self._batches: list[TokenBatch] = []
        self._holds: list[Hold | None] = []
        self._digests: list[dict[str, int]] = []  # per edit: weight it wrote -> CRC-32 right after it

    def __len__(self) -> int:
        return len(self._batches)

    def add(self, handle: WeightEditHandle, batch: TokenBatch, hold: Hold | None = None) -> None:
        """Take over ``handle``, the edit the editor made last, from ``batch``; ``hold``: given the memory the edit was made
        with (None: none), the block its solve ran in beside it (same-relation neighbours, ``editors.neighbours``), entered
        again when ``rollback_to`` makes the edit again."""
        originals = handle.take_originals()
        for name, original in originals.items():
            self._originals.setdefault(name, original)  # later copies are dropped: only the first is needed
        self._batches.append(batch)
        self._holds.append(hold)
        self._digests.append(self._weight_digests(originals))

    def _weight_digests(self, names: dict[str, torch.Tensor] | list[str]) -> dict[str, int]:
        return {name: tensor_digest(self.model.get_parameter(name)) for name in names}

    def rollback_to(self, k: int) -> None:
        """Undo every edit after the first ``k``, bit for bit (``k=0``: all of them, as ``rollback()``)."""
        if not 0 <= k <= len(self):
            raise ValueError(f"cannot roll back to edit {k}: {len(self)} edits are kept")
        if not self.active or k == len(self):
            return
        if k == 0:
            self.rollback()
            return
        batches, holds, digests = self._batches[:k], self._holds[:k], self._digests[:k]
        self._restore()
        self._batches, self._holds, self._digests = [], [], []
        replay = None
        if self._memory is not None:
            replay = copy.copy(self._memory)
            replay.past, replay.calls = dict(self._memory_start[0]), self._memory_start[1]
        for j, (batch, hold, expected) in enumerate(zip(batches, holds, digests), start=1):
            try:
                with remembering(self.editor, replay), scaled_step_sizes(self.editor, self.step_scale):
                    sequence_edit(self.editor, self.model, batch, replay, hold, self.rounds).keep()
            except BaseException:
                self.rollback()
                raise
            if self._weight_digests(list(expected)) != expected:
                self.rollback()
                raise RuntimeError(f"re-applying kept edit {j} of {k} did not give the same weights bit for bit (the editor is "
                                   "not deterministic on this device); the model was reset to its weights before the first edit")
            self._batches.append(batch)
            self._holds.append(hold)
            self._digests.append(expected)

    def rollback(self) -> None:
        super().rollback()
        self._forget()  # nothing is left to undo

    def _restore(self) -> None:
        write_weights(self.model, self._originals)

    def _forget(self) -> None:
        self._originals.clear()
        self._batches.clear()
        self._holds.clear()
        self._digests.clear()


def sequence_edit(editor: Editor, model: nn.Module, batch: TokenBatch, memory: KeyMemory | None = None, hold: Hold | None = None,
                  rounds: int = 1) -> EditHandle:
    """One edit of a sequence (``editor.apply``), inside ``hold(memory)`` if given, in ``rounds`` rounds (a learned editor;
    with ``memory``, the sequence's key memory active in the editor, the rounds count as one call: ``KeyMemory.as_one_call``)."""
    with (hold(memory) if hold is not None else contextlib.nullcontext(),
          memory.as_one_call() if memory is not None and rounds > 1 else contextlib.nullcontext()):
        return editor.apply(model, batch) if rounds == 1 else editor.apply(model, batch, rounds=rounds)  # type: ignore[call-arg]


def apply_in_place(model: nn.Module, result: EditResult) -> WeightEditHandle:
    """Write ``result``'s weights into ``model``; the returned handle rolls them back exactly."""
    return WeightEditHandle(model, result)


@runtime_checkable
class Editor(Protocol):
    """What the evaluation runner and the user API need from any editor."""

    def apply(self, model: nn.Module, batch: TokenBatch) -> EditHandle:
        """Edit ``model`` in place so it produces ``batch``'s labelled targets; return the undo handle."""
        ...


@runtime_checkable
class FunctionalEditor(Editor, Protocol):
    """An editor whose edit is a function of the model: new weights from a split model and a batch, nothing written.

    The evaluation runner scores such an editor on cached prefix states (one prefix pass serves the
    pre-edit logits and the edit; only the edited blocks re-run) and tries packing a case's rows into
    one (checked against padded rows); any other ``Editor`` goes through ``apply`` / ``rollback``.
    MEND implements it.
    """

    method: str  # the registry name a report records
    weights: list[EditableWeight]  # the weights an edit writes (``.name``, ``.transposed``)
    training: bool

    def split(self, model: nn.Module) -> SplitModel:
        """The model as frozen prefix + functional suffix, cut below the first edited block."""
        ...

    def edit(self, model: nn.Module | SplitModel, batch: TokenBatch, state: PrefixState | None = None) -> EditResult:
        """New weights that make ``model`` produce ``batch``'s labelled targets; ``state``: ``split.prefix(batch)`` if known."""
        ...

    def train(self, mode: bool = True) -> Any:
        ...


@contextlib.contextmanager
def scaled_step_sizes(editor: Any, scale: float) -> Iterator[Any]:
    """The editor with its step sizes α (a MEND editor's ``edit_lrs``) multiplied by ``scale`` inside the block, restored
    bit for bit after it (``scale`` 1: untouched, any editor)."""
    if scale == 1.0:
        yield editor
        return
    lrs = getattr(editor, "edit_lrs", None)
    if not isinstance(lrs, torch.Tensor):
        raise ValueError(f"step sizes x {scale:g}: {type(editor).__name__} has no learned step sizes (edit_lrs) to scale")
    original = lrs.detach().clone()
    with torch.no_grad():
        lrs.mul_(scale)
    try:
        yield editor
    finally:
        with torch.no_grad():
            lrs.copy_(original)
