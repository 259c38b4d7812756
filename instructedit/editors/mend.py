"""MEND: a hypernetwork that maps the rank-1 gradient factors (u, δ) of an edit to a weight update.

DESIGN.md §3. One ``GradientTransform`` per weight shape (shared across the layers of that shape,
told apart by per-layer scale/shift), fed the running-normalized concatenation [u; δ], two
low-rank residual layers with identity initialization; the update of weight W is
α_W · Σ_t δ̃_t ũ_tᵀ with one learned α_W per weight (``editor.aggregation: sum``), or, with
``least_squares``, the ridge-regression shift of ``editors/aggregation.py`` (DESIGN.md §9).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from instructedit.config import EditorConfig, ModelConfig
from instructedit.editors.aggregation import NormalEquations, value_differences
from instructedit.editors.base import EditResult, WeightEditHandle, apply_in_place
from instructedit.editors.hooks import Factors, capture_factors
from instructedit.io import atomic_write, write_json
from instructedit.losses import masked_nll, per_row_nll
from instructedit.models.architectures import ArchSpec, EditableWeight, arch_spec, resolve_editable_weights
from instructedit.models.split import PrefixState, SplitModel
from instructedit.records import TokenBatch

logger = logging.getLogger(__name__)

CONFIG_NAME = "editor_config.json"
WEIGHTS_NAME = "editor.safetensors"

Moments = tuple[int, torch.Tensor, torch.Tensor]  # (count, mean, summed squared deviations)
# Gets this process's (u, δ) moments; returns every process's, in rank order, and this process's rank.
StatisticsExchange = Callable[[tuple[Moments, Moments]], tuple[list[tuple[Moments, Moments]], int]]


class RunningNorm(nn.Module):
    """Standardize with the running mean/std of every row seen in training (Chan/Welford merge)."""

    def __init__(self, dim: int, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @staticmethod
    @torch.no_grad()
    def moments(x: torch.Tensor) -> Moments:
        """(count, mean, summed squared deviations) of the rows of ``x``: one contribution to merge."""
        n = x.shape[0]
        if n == 0:
            return 0, x.new_zeros(x.shape[1:]), x.new_zeros(x.shape[1:])
        mean = x.mean(0)
        return n, mean, ((x - mean) ** 2).sum(0)

    @torch.no_grad()
    def merge(self, n_new: int, mean_new: torch.Tensor, m2_new: torch.Tensor) -> None:
        """Chan's parallel update: fold one contribution into the running statistics."""
        if n_new == 0:
            return
        n_old = float(self.count)
        total = n_old + n_new
        delta = mean_new - self.mean
        self.mean += delta * (n_new / total)
        self.m2 += m2_new + delta**2 * (n_old * n_new / total)
        self.count.fill_(total)

    def update(self, x: torch.Tensor) -> None:
        self.merge(*self.moments(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(self.count) < 2:
            return x - self.mean
        std = (self.m2 / (float(self.count) - 1)).sqrt()
        return (x - self.mean) / (std + self.eps)


class LowRankResidual(nn.Module):
    """h ↦ act(A(B h') + b) + h' with h' = h·scale[mode] + shift[mode]; A = 0 makes it the identity."""

    def __init__(self, dim: int, rank: int, n_modes: int, relu: bool) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.zeros(dim, rank))
        self.B = nn.Parameter(torch.randn(rank, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))
        self.relu = relu

    def forward(self, h: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
        h = h * self.scale[mode] + self.shift[mode]  # (n_tokens, dim)
        out = (h @ self.B.T) @ self.A.T + self.bias
        return (torch.relu(out) if self.relu else out) + h


class GradientTransform(nn.Module):
    """The MEND network shared by all editable weights of one shape (d_out, d_in)."""

    def __init__(self, d_out: int, d_in: int, rank: int, n_hidden: int, n_modes: int, eps: float) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.norm_u = RunningNorm(d_in, eps)
        self.norm_delta = RunningNorm(d_out, eps)
        # MEND's IDMLP: ReLU on the hidden layers, a linear last layer, each residual.
        self.layers = nn.ModuleList(LowRankResidual(dim, min(rank, dim), n_modes, relu=i < n_hidden) for i in range(n_hidden + 1))
        # Data-parallel training sets this (instructedit.distributed), so that every process holds the
        # statistics of every process's tokens; None: a single process.
        self.exchange: StatisticsExchange | None = None

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.training:
            h = self._normalized(u, delta)
        else:
            local = (RunningNorm.moments(u), RunningNorm.moments(delta))
            everyone, rank = self.exchange(local) if self.exchange is not None else ([local], 0)
            # Lower ranks' micro-batches first, then ours, then the rest: the order in which one
            # process running all of them one after the other would have merged them.
            self.merge_statistics(everyone[: rank + 1])
            h = self._normalized(u, delta)
            self.merge_statistics(everyone[rank + 1 :])
        for layer in self.layers:
            h = layer(h, mode)
        return h[:, : self.d_in], h[:, self.d_in :]

    def _normalized(self, u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.norm_u(u), self.norm_delta(delta)], dim=-1)  # (n_tokens, d_in + d_out)

    def merge_statistics(self, contributions: list[tuple[Moments, Moments]]) -> None:
        """Fold (u moments, δ moments) contributions into the running statistics, in list order."""
        for moments_u, moments_delta in contributions:
            self.norm_u.merge(*moments_u)
            self.norm_delta.merge(*moments_delta)


def _shape_key(weight: EditableWeight) -> str:
    return f"{weight.shape[0]}x{weight.shape[1]}"


class MENDEditor(nn.Module):
    """Turns one forward/backward on an edit example into functional weight updates."""

    def __init__(self, weights: list[EditableWeight], config: EditorConfig | None = None, architecture: ArchSpec | None = None, model_name: str = "") -> None:
        super().__init__()
        if not weights:
            raise ValueError("MENDEditor needs at least one editable weight")
        self.config = config or EditorConfig()
        self.weights = list(weights)
        self.architecture = architecture
        self.model_name = model_name
        self.groups: dict[str, list[EditableWeight]] = {}
        for w in self.weights:
            self.groups.setdefault(_shape_key(w), []).append(w)
        self.transforms = nn.ModuleDict(
            {
                key: GradientTransform(ws[0].shape[0], ws[0].shape[1], self.config.rank, self.config.n_hidden, len(ws), self.config.eps)
                for key, ws in self.groups.items()
            }
        )
        self.edit_lrs = nn.Parameter(torch.full((len(self.weights),), self.config.init_edit_lr))
        if self.config.aggregation == "least_squares":
            # λ per weight, the ridge strength being e^λ; only least-squares editors have (and save) it.
            self.lambdas = nn.Parameter(torch.zeros(len(self.weights)))
        self._split_cache: tuple[int, SplitModel] | None = None

    @classmethod
    def for_model(cls, model: nn.Module, model_config: ModelConfig, editor_config: EditorConfig) -> "MENDEditor":
        """A fresh (identity-initialized) editor of ``model``'s inner weights as ``model_config`` names them."""
        override = ArchSpec.from_dict(model_config.architecture) if model_config.architecture else None
        spec = arch_spec(model, override)
        weights = resolve_editable_weights(model, spec, model_config.edit_weights or None, model_config.last_n_layers)
        return cls(weights, editor_config, override, model_config.name)

    @property
    def network_parameters(self) -> list[nn.Parameter]:
        """What meta-training's first optimizer trains besides the step sizes α: the networks (and λ)."""
        ridge = [self.lambdas] if self.config.aggregation == "least_squares" else []
        return list(self.transforms.parameters()) + ridge

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

    def transform(self, factors: dict[str, Factors]) -> dict[str, torch.Tensor]:
        """α · Σ_t δ̃_t ũ_tᵀ per weight, in the parameter's storage orientation."""
        updates: dict[str, torch.Tensor] = {}
        for i, w, _, u_w, d_w in self.network_outputs(factors):
            grad = d_w.T @ u_w  # (d_out, d_in)
            updates[w.name] = self.edit_lrs[i] * (grad.T if w.transposed else grad)
        return updates

    def network_outputs(self, factors: dict[str, Factors]) -> Iterator[tuple[int, EditableWeight, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(index, weight, u, ũ, δ̃) per weight: the float32 keys and the network's outputs, (n_tokens, d)."""
        index = {w.name: i for i, w in enumerate(self.weights)}
        for key, ws in self.groups.items():
            # The network and its statistics stay float32 on the editor's device whatever the base model's dtype.
            device = self.edit_lrs.device
            us = [factors[w.name].u.to(device=device, dtype=torch.float32) for w in ws]
            deltas = [factors[w.name].delta.to(device=device, dtype=torch.float32) for w in ws]
            counts = [u.shape[0] for u in us]
            mode = torch.repeat_interleave(torch.arange(len(ws), device=us[0].device), torch.tensor(counts, device=us[0].device))
            u_t, delta_t = self.transforms[key](torch.cat(us), torch.cat(deltas), mode)
            for w, u, u_w, d_w in zip(ws, us, u_t.split(counts), delta_t.split(counts)):
                yield index[w.name], w, u, u_w, d_w

    def solve(self, split: SplitModel, batch: TokenBatch, state: PrefixState | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Least-squares updates (storage orientation) from every edit of ``batch``, and the mean pre-edit NLL per edit.

        ``editor.chunk_edits`` edit inputs at a time: capture their factors (δ from the sum of each
        edit's mean NLL), run the network, fold keys and value differences into KᵀK and KᵀD; then
        solve once per weight (editors/aggregation.py). ``state`` is used when the batch is one chunk.
        """
        systems = {w.name: NormalEquations() for w in self.weights}
        chunks = batch.chunks(self.config.chunk_edits)
        if len(chunks) > 1 and self.training and any(t.exchange is not None for t in self.transforms.values()):
            # Each chunk is one statistics exchange round; processes with other row counts would wait forever.
            raise ValueError(f"data-parallel training with editor.aggregation least_squares needs editor.chunk_edits >= the "
                             f"{batch.n_rows} edit inputs of a micro-batch (it is {self.config.chunk_edits})")
        whole = state if state is not None and len(chunks) == 1 else None
        total = sum(self._accumulate(split, chunk, whole, systems) for chunk in chunks)
        updates = {}
        for i, w in enumerate(self.weights):
            shift = systems[w.name].solve(self.lambdas[i])  # (d_in, d_out): Conv1D's storage orientation
            updates[w.name] = shift if w.transposed else shift.T
        return updates, total / batch.n_rows

    def _accumulate(self, split: SplitModel, chunk: TokenBatch, state: PrefixState | None, systems: dict[str, NormalEquations]) -> torch.Tensor:
        """Fold one chunk of edits into ``systems``; returns the sum of their pre-edit NLLs. Its activations die on return."""
        state = state if state is not None else split.prefix(chunk)
        with torch.enable_grad(), capture_factors(split.model, self.weights) as capture:
            logits = split.logits_at(split.suffix(state), chunk.label_mask)
            losses = per_row_nll(logits, chunk.labels[chunk.label_mask], chunk.label_rows, chunk.n_rows)  # (rows,)
            factors = capture.factors(losses.sum())
        for i, w, keys, keys_t, deltas_t in self.network_outputs(factors):
            systems[w.name].add(keys, value_differences(keys, keys_t, deltas_t, self.edit_lrs[i]))
        return losses.detach().sum()

    def edit(self, model: nn.Module | SplitModel, batch: TokenBatch, state: PrefixState | None = None) -> EditResult:
        """One MEND edit from all rows of ``batch`` (its labelled tokens are the targets); the model is not modified.

        The rows' updates are summed or solved for by least squares, as ``editor.aggregation`` says.
        """
        split = self.split(model)
        mask = batch.label_mask
        if not bool(mask.any()):
            raise ValueError("the edit batch has no target tokens to learn")
        if self.config.aggregation == "least_squares":
            updates, loss = self.solve(split, batch, state)
        else:
            state = state if state is not None else split.prefix(batch)
            with torch.enable_grad(), capture_factors(split.model, self.weights) as capture:
                logits = split.logits_at(split.suffix(state), mask)
                loss = masked_nll(logits, batch.labels[mask])
                factors = capture.factors(loss)
            updates = self.transform(factors)
        new_params = {}
        for w in self.weights:
            param = split.model.get_parameter(w.name)
            # Add in float32, round once: a bf16/fp16 weight would otherwise also round the small update.
            new_params[w.name] = (param.float() + updates[w.name].to(param.device)).to(param.dtype)
        return EditResult(new_params=new_params, updates=updates, pre_edit_loss=loss.detach())

    @torch.no_grad()
    def apply(self, model: nn.Module, batch: TokenBatch) -> WeightEditHandle:
        """Edit ``model`` in place; the handle (also a context manager) rolls back bit-exactly."""
        was_training = self.training
        self.eval()
        try:
            result = self.edit(model, batch)
        finally:
            self.train(was_training)
        return apply_in_place(model, result)

    # -- persistence ---------------------------------------------------------------------------
    def editor_config(self) -> dict:
        return {
            "method": "mend",
            "model_name": self.model_name,
            "editor": dataclasses.asdict(self.config),
            "weights": [dataclasses.asdict(w) for w in self.weights],
            "architecture": dataclasses.asdict(self.architecture) if self.architecture else None,
        }

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Write ``editor_config.json`` + ``editor.safetensors`` (network, α, normalization statistics)."""
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
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "MENDEditor":
        """Load what ``save_pretrained`` wrote; a damaged folder raises one ValueError naming the folder and the file."""
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
        if data.get("method") != "mend":
            raise ValueError(f"{config_path}: method {data.get('method')!r} is not 'mend'")
        missing = [key for key in ("weights", "editor") if key not in data]
        if missing:
            raise _corrupt(directory, CONFIG_NAME, f"lacks the field(s) {missing}")
        try:
            weights = [EditableWeight(**{**w, "shape": tuple(w["shape"])}) for w in data["weights"]]
            arch = data.get("architecture")
            arch_obj = ArchSpec.from_dict(arch) if arch else None
            editor = cls(weights, EditorConfig(**data["editor"]), arch_obj, data.get("model_name", ""))
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


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def _corrupt(directory: Path, file: str, why: str) -> ValueError:
    return ValueError(f"{directory} holds an incomplete or corrupt editor: {directory / file} {why}; "
                      "save or download it again, or use another checkpoint")
