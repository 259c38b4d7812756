"""GRACE baseline: a discrete key–value codebook that replaces one MLP layer's output near edited keys.

Follows Hartvigsen et al. 2023 ("Aging with GRACE") as EasyEdit's ``GRACE`` implements it: the
adapter sits on one layer (default the MLP down-projection of block ``-3``; EasyEdit uses
``down_proj`` of block 27 of LLaMA-2-7B's 32 with 50 iterations, ``c_fc`` of block 35 of GPT-2 XL's
48 with 200), the key of an edit is that layer's *input* at the last prompt token (the position
before the first labelled token), its value is a vector trained with Adam (lr 1.0, up to
``n_iter`` steps, cold = uniform random or warm = current output init) so that substituting it for
the layer output makes the targets likely, and each key carries a deferral radius ε (Euclidean,
``eps_init`` for a new key). Codebook rule (GRACE's "coverage" variant): a new key farther than
ε_init + ε_j from its nearest key j is added; within that distance with the same target it expands
ε_j to the distance (we never shrink it, GRACE does) and retrains value j; with a different target
both radii become half the distance and the new key is added.
Our choices and simplifications: at inference every token's key is compared with the codebook and
the output is replaced from the first matching token onwards (with the value of the latest match),
which keeps the layer causal and lets a teacher-forced target see the value at every target
position; ties go to the newest key. Rows of a batch whose keys coincide (e.g. one prompt with
several responses) share one key whose target is the set of their targets. With a KV cache only
the tokens whose own key matches are replaced. No perturbation (``adv``) training, no MMD/cosine
distances. The model's parameters are never touched; the hook is removed when the codebook empties.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from instructedit.editors.base import EditHandle
from instructedit.editors.ft import check_batch, check_field, config_from_options, fit_edit_loss, resolve_mlp_weight
from instructedit.models.architectures import ArchSpec
from instructedit.records import TokenBatch

logger = logging.getLogger(__name__)

Label = tuple[tuple[int, ...], ...]  # the target token ids of every row that shares a key


@dataclass
class GRACEConfig:
    """GRACE hyperparameters (EasyEdit ``GRACE`` defaults where it has them)."""

    layer: int = -3  # block whose MLP module carries the codebook; negative counts from the last block
    module: str | None = None  # one of the architecture's mlp_modules; None: the last (down_proj / c_proj)
    lr: float = 1.0  # Adam step size for the value vectors
    n_iter: int = 100  # value training steps per edit
    eps_init: float = 1.0  # deferral radius of a new key (Euclidean, in the layer input's units)
    val_init: str = "cold"  # "cold": uniform [0, 1) random; "warm": the layer's current output
    early_stop_loss: float = 1e-2  # value training stops once the edit loss is below this
    seed: int = 0  # for the cold value initialization

    def __post_init__(self) -> None:
        check_field(self.lr > 0, "grace", "lr", f"{self.lr} must be > 0")
        check_field(self.n_iter >= 1, "grace", "n_iter", f"{self.n_iter} must be >= 1")
        check_field(self.eps_init > 0, "grace", "eps_init", f"{self.eps_init} must be > 0")
        check_field(self.val_init in ("cold", "warm"), "grace", "val_init", f"{self.val_init!r} is not 'cold' or 'warm'")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "GRACEConfig":
        return config_from_options(cls, options, "grace")


@dataclass(frozen=True)
class CodebookEntry:
    key: torch.Tensor  # (d_in,) float32
    value: torch.Tensor  # (d_out,) float32; an nn.Parameter while it is being trained
    epsilon: float
    label: Label


class Codebook:
    """The entries of one adapted module and the forward hook that reads them."""

    def __init__(self, module: nn.Module) -> None:
        self.entries: list[CodebookEntry] = []
        self.hook: RemovableHandle | None = module.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None

    def nearest(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to and index of the nearest entry for each row of ``keys`` (..., d_in); ties -> newest."""
        table = torch.stack([e.key for e in self.entries]).to(keys.device)  # (n, d_in)
        flat = keys.detach().reshape(-1, keys.shape[-1]).float()
        # exact differences, not the |x|² - 2x·k + |k|² shortcut: a key must be at distance 0 from itself
        dist = torch.cdist(flat, table, compute_mode="donot_use_mm_for_euclid_dist")  # (tokens, n)
        dist, rev = dist.flip(-1).min(-1)  # flipped, so the newest of equally near entries wins
        index = len(self.entries) - 1 - rev
        return dist.view(keys.shape[:-1]), index.view(keys.shape[:-1])

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        if not self.entries:
            return None
        x = args[0] if args else next(iter(kwargs.values()))  # (batch, seq, d_in)
        dist, index = self.nearest(x)  # (batch, seq)
        eps = torch.tensor([e.epsilon for e in self.entries], device=x.device)
        match = dist <= eps[index]
        positions = torch.arange(x.shape[1], device=x.device).expand_as(match)
        # the latest matching position at or before t (-1: none yet) -> replace from the first match on
        last = torch.where(match, positions, -1).cummax(dim=1).values
        active = last >= 0
        if not bool(active.any()):
            return None
        entry = index.gather(1, last.clamp(min=0))  # (batch, seq)
        values = torch.stack([e.value for e in self.entries]).to(device=x.device)  # (n, d_out)
        return torch.where(active[..., None], values[entry].to(output.dtype), output)


class GRACEHandle(EditHandle):
    """Undoes one GRACE edit: drops the entries it added, restores the ones it changed."""

    def __init__(self, editor: "GRACEEditor", model: nn.Module, codebook: Codebook, changes: list[tuple[CodebookEntry | None, CodebookEntry]]) -> None:
        super().__init__()
        self._editor = editor
        self._model = model
        self._codebook = codebook
        self._changes = changes  # (entry before the edit or None if added, entry after the edit)

    def _restore(self) -> None:
        entries = self._codebook.entries
        for old, new in reversed(self._changes):
            at = next((i for i, e in enumerate(entries) if e is new), None)
            if at is None:
                continue  # already replaced by a later edit that is still applied
            if old is None:
                del entries[at]
            else:
                entries[at] = old
        if not entries:
            self._editor.detach(self._model)

    def _forget(self) -> None:
        self._changes = []


class GRACEEditor:
    """Adds a codebook entry per edit; the codebook (and its hook) persists across kept edits."""

    def __init__(self, config: GRACEConfig | None = None, architecture: ArchSpec | None = None) -> None:
        self.config = config or GRACEConfig()
        self.architecture = architecture
        self._codebooks: weakref.WeakKeyDictionary[nn.Module, Codebook] = weakref.WeakKeyDictionary()

    def module_name(self, model: nn.Module) -> str:
        return resolve_mlp_weight(model, self.config.layer, self.config.module, self.architecture).module_name

    def codebook(self, model: nn.Module) -> Codebook:
        """This editor's codebook on ``model``, created (hook registered) on first use."""
        if model not in self._codebooks:
            self._codebooks[model] = Codebook(model.get_submodule(self.module_name(model)))
        return self._codebooks[model]

    def detach(self, model: nn.Module) -> None:
        """Remove the hook and forget the codebook of ``model``."""
        codebook = self._codebooks.pop(model, None)
        if codebook is not None:
            codebook.remove()

    def _queries(self, model: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer input and output at each row's last prompt token: (rows, d_in), (rows, d_out)."""
        module = model.get_submodule(self.module_name(model))
        seen: dict[str, torch.Tensor] = {}

        def grab(mod: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            seen["x"] = (args[0] if args else next(iter(kwargs.values()))).detach()
            seen["y"] = output.detach()

        handle = module.register_forward_hook(grab, with_kwargs=True, prepend=True)
        try:
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        finally:
            handle.remove()
        rows = torch.arange(batch.labels.shape[0], device=batch.labels.device)
        position = batch.label_mask.long().argmax(1)  # the first labelled position is the last prompt token
        return seen["x"][rows, position].float(), seen["y"][rows, position].float()

    @staticmethod
    def _groups(batch: TokenBatch, keys: torch.Tensor) -> list[tuple[int, Label]]:
        """(first row, label) per set of rows whose keys coincide (up to float noise)."""
        targets = [tuple(row[m].tolist()) for row, m in zip(batch.labels, batch.label_mask)]
        groups: list[list[int]] = []
        for i in range(len(keys)):
            if not targets[i]:
                continue  # a row without target tokens has nothing to learn
            tol = 1e-4 * (1.0 + float(keys[i].norm()))
            home = next((g for g in groups if float((keys[g[0]] - keys[i]).norm()) <= tol), None)
            if home is None:
                groups.append([i])
            else:
                home.append(i)
        return [(g[0], tuple(sorted({targets[i] for i in g}))) for g in groups]

    def apply(self, model: nn.Module, batch: TokenBatch) -> GRACEHandle:
        """Add (or expand/split) codebook entries for ``batch`` and train their values."""
        check_batch(batch, "grace")
        cfg = self.config
        keys, outputs = self._queries(model, batch)
        codebook = self.codebook(model)
        entries = codebook.entries
        generator = torch.Generator().manual_seed(cfg.seed)
        changes: list[tuple[CodebookEntry | None, CodebookEntry]] = []
        trained: dict[int, None] = {}  # indices (into entries) of the values this edit trains, in order
        for row, label in self._groups(batch, keys):
            key = keys[row].clone()
            if cfg.val_init == "warm":
                init = outputs[row].clone()
            else:
                init = torch.rand(outputs.shape[-1], generator=generator).to(outputs.device)
            new = CodebookEntry(key, nn.Parameter(init), cfg.eps_init, label)
            if entries:
                dist_t, index_t = codebook.nearest(key[None])
                dist, j = float(dist_t), int(index_t)
                near = entries[j]
                if dist <= cfg.eps_init + near.epsilon:
                    if near.label == label:  # same target: grow the ball to cover the new key, retrain its value
                        grown = replace(near, value=nn.Parameter(near.value.detach().clone()), epsilon=max(near.epsilon, dist))
                        changes.append((near, grown))
                        entries[j] = grown
                        trained[j] = None
                        continue
                    halved = replace(near, epsilon=dist / 2)  # conflicting targets: split the radii
                    changes.append((near, halved))
                    entries[j] = halved
                    new = replace(new, epsilon=dist / 2)
            entries.append(new)
            changes.append((None, new))
            trained[len(entries) - 1] = None
        try:
            self._train(model, batch, codebook, list(trained))
        except BaseException:
            GRACEHandle(self, model, codebook, changes).rollback()  # leave the codebook as it was
            raise
        for j in trained:  # freeze: store plain tensors, and point the undo record at the final entries
            frozen = replace(entries[j], value=entries[j].value.detach().clone())
            changes = [(old, frozen if new is entries[j] else new) for old, new in changes]
            entries[j] = frozen
        return GRACEHandle(self, model, codebook, changes)

    def _train(self, model: nn.Module, batch: TokenBatch, codebook: Codebook, trained: list[int]) -> None:
        cfg = self.config
        values = [codebook.entries[j].value for j in trained]
        first, last = fit_edit_loss(model, batch, values, cfg.lr, cfg.n_iter, cfg.early_stop_loss)
        logger.debug("grace: %d entries, trained %d values, loss %.4g -> %.4g", len(codebook.entries), len(values), first, last)
