"""MEND: a hypernetwork that maps the rank-1 gradient factors (u, δ) of an edit to a weight update.

DESIGN.md §3. One ``GradientTransform`` per weight shape (shared across the layers of that shape,
told apart by per-layer scale/shift), fed the running-normalized concatenation [u; δ], two
low-rank residual layers with identity initialization; the update of weight W is
α_W · Σ_t δ̃_t ũ_tᵀ with one learned α_W per weight (``editor.aggregation: sum``), or, with
``least_squares``, the ridge-regression shift of ``editors/aggregation.py`` (DESIGN.md §9).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from instructedit.config import PRESERVE_KEYS, EditorConfig
from instructedit.editors.aggregation import KeyMemory, NormalEquations, base_inverse, check_remembers, value_differences
from instructedit.editors.base import EditResult, ThinParams, ThinUpdates
from instructedit.editors.hooks import Factors, capture_factors
# CONFIG_NAME, WEIGHTS_NAME and nonfinite_tensors are imported from here by older modules: they live in editors/learned.py
from instructedit.editors.learned import CONFIG_NAME, WEIGHTS_NAME, LearnedEditor, nonfinite_tensors, read_editor_config  # noqa: F401
from instructedit.io import atomic_write
from instructedit.losses import per_row_nll
from instructedit.models.architectures import ArchSpec, EditableWeight, transposed_of
from instructedit.models.split import ChunkStates, PrefixState, SplitModel
from instructedit.records import TokenBatch
from instructedit.runs import PRESERVATION_TEXTS, PRESERVATION_WEIGHTS

logger = logging.getLogger(__name__)

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

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` standardized; ``out`` (without gradients): written there, no tensor allocated (the same bits)."""
        centred = torch.sub(x, self.mean, out=out)
        if float(self.count) < 2:
            return centred
        return centred.div_((self.m2 / (float(self.count) - 1)).sqrt() + self.eps)  # sub's backward keeps no output


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

    @torch.no_grad()
    def forward_in_place(self, h: torch.Tensor, segments: Sequence[tuple[int, int]], out: torch.Tensor) -> torch.Tensor:
        """``forward`` without gradients, the rows of mode i being ``h[a:b]`` for (a, b) = ``segments[i]``: the same
        operations in the same order (the same bits), written into ``out`` (returned) and ``h`` (which then holds h'),
        with no gather of the per-mode scale and shift and no (n_tokens, dim) tensor allocated: on a CPU those took ~4 of
        the network's ~10 ms in an edit of the default model (2026-12-06; ~1.4 ms less an edit this way)."""
        for i, (a, b) in enumerate(segments):
            h[a:b].mul_(self.scale[i]).add_(self.shift[i])
        torch.mm(h @ self.B.T, self.A.T, out=out).add_(self.bias)
        if self.relu:
            out.relu_()
        return out.add_(h)


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

    @torch.no_grad()
    def forward_in_place(self, us: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of the rows of ``us``/``deltas`` (one pair per mode, in mode order) without gradients, in eval
        mode: the same bits, in two (n_tokens, d_in + d_out) buffers (``LowRankResidual.forward_in_place``)."""
        ends = list(itertools.accumulate(u.shape[0] for u in us))
        segments = list(zip([0, *ends[:-1]], ends))
        h, spare = (us[0].new_empty(ends[-1], self.d_in + self.d_out) for _ in range(2))
        for (a, b), u, delta in zip(segments, us, deltas):
            self.norm_u(u, out=h[a:b, : self.d_in])
            self.norm_delta(delta, out=h[a:b, self.d_in :])
        for layer in self.layers:
            h, spare = layer.forward_in_place(h, segments, spare), h
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


def read_preservation_texts(directory: str | Path, count: int | None) -> list[tuple[str, str]]:
    """The (prompt, answer) texts of a saved editor's preservation sample (``PRESERVATION_TEXTS``); none where the folder
    has no such file and its config names none (``count``: the number it names; editors calibrated before texts were saved
    name none)."""
    from instructedit.io import read_json

    path = Path(directory) / PRESERVATION_TEXTS
    if not path.is_file():
        if count:
            raise ValueError(f"{directory} holds an incomplete editor: its {CONFIG_NAME} names {count} preservation texts but "
                             f"{path} is missing")
        return []
    try:
        texts = [(prompt, answer) for prompt, answer in read_json(path)["texts"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected {{\"texts\": [[prompt, answer], ...]}} ({type(e).__name__}: {e})") from None
    bad = next((i for i, (p, a) in enumerate(texts) if not isinstance(p, str) or not isinstance(a, str) or not p), None)
    if bad is not None:
        raise ValueError(f"{path}: text {bad} is not a (non-empty prompt, answer) pair of strings: {texts[bad]!r}")
    if count is not None and len(texts) != count:
        raise ValueError(f"{path}: {len(texts)} texts where its {CONFIG_NAME} names {count}")
    return texts


class MENDEditor(LearnedEditor):
    """Turns one forward/backward on an edit example into functional weight updates."""

    method = "mend"

    def __init__(self, weights: list[EditableWeight], config: EditorConfig | None = None, architecture: ArchSpec | None = None, model_name: str = "") -> None:
        super().__init__(weights, config, architecture, model_name)
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
        self.memory: KeyMemory | None = None  # least_squares: keys held still by every solve (``remembering``)
        # least_squares: a preservation sample's key covariance that every solve holds still, saved with the editor
        # (``set_preservation``); a ``remembering`` memory with its own sample replaces it
        self.preservation: KeyMemory | None = None
        self.preservation_source = ""
        # the sample's (prompt, answer) texts where they were saved with it: a key memory can hold them again, continued
        # with what the model says (``edit --preserve-data editor``)
        self.preservation_texts: list[tuple[str, str]] = []
        self._base_inverses: dict[str, tuple[tuple, torch.Tensor | None]] = {}  # weight name -> (what it was made from, B⁻¹)
        # least_squares: weight name -> the shift already made to it since the model was last as it should be kept
        # (storage orientation: earlier rounds of ``apply(anchored=True)``, earlier edits of an anchored sequence); every
        # solve then holds the preservation sample's keys' outputs to those of the weights before that shift (``solve``)
        self.anchor: Mapping[str, torch.Tensor] | None = None

    @property
    def network_parameters(self) -> list[nn.Parameter]:
        """What meta-training's first optimizer trains besides the step sizes α: the networks (and λ)."""
        ridge = [self.lambdas] if self.config.aggregation == "least_squares" else []
        return list(self.transforms.parameters()) + ridge

    def transform(self, factors: dict[str, Factors], with_factors: bool = False, dense: bool | None = None):
        """α · Σ_t δ̃_t ũ_tᵀ per weight, in the parameter's storage orientation; ``with_factors``: also as
        ``EditResult.low_rank`` factors (ũᵀ, α·δ̃): x · ũᵀ · α·δ̃ is x times the update in either orientation.
        ``dense``: whether the dense updates are formed (default: with gradients, or without factors); when not, the
        updates are ``ThinUpdates`` of the factors (formed where read)."""
        updates: dict[str, torch.Tensor] = {}
        low_rank: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if dense is None:
            dense = not with_factors or torch.is_grad_enabled()  # without gradients the factors say it all
        if not dense and not with_factors:
            raise ValueError("transform(dense=False) returns the updates as factors: it needs with_factors=True")
        for i, w, _, u_w, d_w in self.network_outputs(factors):
            scaled = self.edit_lrs[i] * d_w  # α on the (tokens, d_out) factor: one pass over it, not over the (d_out, d_in) product
            if dense:
                update = scaled.T @ u_w  # (d_out, d_in)
                updates[w.name] = update.T if w.transposed else update
            if with_factors:
                low_rank[w.name] = (u_w.T, scaled)
        if not dense:
            return ThinUpdates(low_rank, transposed_of(self.weights)), low_rank
        return (updates, low_rank) if with_factors else updates

    def network_outputs(self, factors: dict[str, Factors]) -> Iterator[tuple[int, EditableWeight, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(index, weight, u, ũ, δ̃) per weight: the float32 keys and the network's outputs, (n_tokens, d)."""
        index = {w.name: i for i, w in enumerate(self.weights)}
        for key, ws in self.groups.items():
            # The network and its statistics stay float32 on the editor's device whatever the base model's dtype.
            device = self.edit_lrs.device
            us = [factors[w.name].u.to(device=device, dtype=torch.float32) for w in ws]
            deltas = [factors[w.name].delta.to(device=device, dtype=torch.float32) for w in ws]
            counts = [u.shape[0] for u in us]
            transform = self.transforms[key]
            if not transform.training and not torch.is_grad_enabled():  # an edit: the same bits, less memory traffic
                u_t, delta_t = transform.forward_in_place(us, deltas)
            else:
                mode = torch.repeat_interleave(torch.arange(len(ws), device=us[0].device), torch.tensor(counts, device=us[0].device))
                u_t, delta_t = transform(torch.cat(us), torch.cat(deltas), mode)
            for w, u, u_w, d_w in zip(ws, us, u_t.split(counts), delta_t.split(counts)):
                yield index[w.name], w, u, u_w, d_w

    def solve(self, split: SplitModel, batch: TokenBatch,
              state: PrefixState | ChunkStates | None = None) -> tuple[Mapping[str, torch.Tensor], torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]] | None]:
        """Least-squares updates (storage orientation) from every edit of ``batch``, the mean pre-edit NLL per edit, and
        (without gradients, few tokens) every update's thin factors (``EditResult.low_rank``; else None).

        ``editor.chunk_edits`` edit inputs at a time: capture their factors (δ from the sum of each
        edit's mean NLL), run the network, fold keys and value differences into KᵀK and KᵀD; then
        solve once per weight (editors/aggregation.py). ``state``: the batch's prefix state when it is one chunk, or
        every chunk's (``ChunkStates``, from ``round_state``).
        """
        systems = {w.name: NormalEquations() for w in self.weights}
        chunks = batch.chunks(self.config.chunk_edits)
        if len(chunks) > 1 and self.training and any(t.exchange is not None for t in self.transforms.values()):
            # Each chunk is one statistics exchange round; processes with other row counts would wait forever.
            raise ValueError(f"data-parallel training with editor.aggregation least_squares needs editor.chunk_edits >= the "
                             f"{batch.n_rows} edit inputs of a micro-batch (it is {self.config.chunk_edits})")
        if isinstance(state, ChunkStates):
            if state.size != self.config.chunk_edits or len(state.states) != len(chunks):
                raise ValueError(f"the chunk states hold {len(state.states)} chunks of {state.size} rows; this batch is "
                                 f"{len(chunks)} chunks of {self.config.chunk_edits}")
            states = state.states
        else:
            states = [state if state is not None and len(chunks) == 1 else None] * len(chunks)
        total = sum(self._accumulate(split, chunk, s, systems) for chunk, s in zip(chunks, states))
        updates, thin = {}, {}
        memory = self.memory
        for i, w in enumerate(self.weights):
            offset = self._anchor_offset(w)
            # without gradients and with few tokens, S as two thin factors (one smaller solve; cheap to decode with)
            factors = None
            if offset is None and not torch.is_grad_enabled():
                inverse = self._preservation_inverse(i, w.name)
                factors = systems[w.name].solve_factors(self.lambdas[i], None if inverse is not None else self._prior(w.name), inverse)
            if factors is not None:
                thin[w.name] = factors
            else:
                shift = systems[w.name].solve(self.lambdas[i], self._prior(w.name), offset)
                updates[w.name] = shift if w.transposed else shift.T  # shift (d_in, d_out): Conv1D's storage orientation
        if memory is not None:
            memory.remember({w.name: systems[w.name].gram for w in self.weights})
        transposed = transposed_of(self.weights)
        if len(thin) == len(self.weights):  # every ΔW as factors: formed densely only where read
            return ThinUpdates(thin, transposed), total / batch.n_label_rows, thin
        formed = ThinUpdates(thin, transposed)
        return {w.name: updates[w.name] if w.name in updates else formed[w.name] for w in self.weights}, total / batch.n_label_rows, None

    def _prior(self, name: str, past: bool = True) -> torch.Tensor | None:
        """The keys weight ``name``'s solve holds still: the active memory's, plus the editor's own preservation sample
        unless that memory brings a sample of its own; ``past=False``: the preservation sample's alone, without the
        memory's earlier edits."""
        memory, own = self.memory, self.preservation
        terms = [memory.prior(name, past) if memory is not None else None]
        if own is not None and not (memory is not None and memory.text_weight and memory.text):
            terms.append(own.prior(name))
        terms = [t.to(self.edit_lrs.device) for t in terms if t is not None]
        return sum(terms[1:], terms[0]) if terms else None

    def _anchor_offset(self, w: EditableWeight) -> torch.Tensor | None:
        """P_sample A (d_in, d_out) for weight ``w``'s solve while ``anchor`` holds its shift A and the solves hold a
        sample; else None. The sample's keys' outputs are then held to those of the weights before A, not to the current
        ones (earlier edits' keys, if remembered, to the current): min ‖K S − D‖² + e^λ‖S‖² + ‖P_past^½ S‖² +
        ‖P_sample^½ (A + S)‖², whose KᵀD is KᵀD − P_sample A."""
        made = self.anchor.get(w.name) if self.anchor is not None else None
        held = self._prior(w.name, past=False) if made is not None else None
        if held is None:
            return None
        made = made.to(held.device, held.dtype)
        return held @ (made if w.transposed else made.T)

    def holds_sample(self) -> bool:
        """Whether the solves hold a preservation sample's keys (the editor's own or an active memory's): what an anchor
        (``anchor``, ``apply(anchored=True)``) holds to the weights before a shift."""
        return any(self._prior(w.name, past=False) is not None for w in self.weights)

    def _preservation_inverse(self, i: int, name: str) -> torch.Tensor | None:
        """Without a ``remembering`` memory, the inverse of weight ``name``'s fixed part of the system, its
        preservation sample's covariance + e^λ I (``aggregation.base_inverse``), made once and kept while the sample and
        λ stay: one edit's solve is then n_tokens-sized (``push_through_left``). None without a sample or with a memory."""
        own = self.preservation
        if own is None or self.memory is not None:
            return None
        device = self.edit_lrs.device
        key = (id(own), own.text_weight, float(self.lambdas[i]), str(device))
        cached = self._base_inverses.get(name)
        if cached is None or cached[0] != key:
            cached = (key, base_inverse(self.lambdas[i], own.prior(name).to(device)))
            self._base_inverses[name] = cached
        return cached[1]

    def set_preservation(self, memory: KeyMemory | None, source: str = "", texts: Sequence[tuple[str, str]] = ()) -> None:
        """Make every solve hold ``memory``'s preservation sample still (``key_memory(..., past_weight=0, text_weight=W)``),
        also after ``save_pretrained`` / ``from_pretrained``; ``source`` says what the sample is, ``texts`` the (prompt,
        answer) texts it was made of (saved too: ``preservation_texts``). None removes it."""
        if memory is not None:
            if self.config.aggregation != "least_squares":
                raise ValueError(f"a preservation sample needs an editor with editor.aggregation least_squares; this one is {self.config.aggregation!r}")
            missing = [w.name for w in self.weights if w.name not in memory.text]
            problems = [why for bad, why in ((memory.past, "it holds past edits' keys"), (not memory.text_weight, "its text_weight is 0"),
                                             (missing, f"it has no covariance for {missing[:3]}")) if bad]
            if problems:
                raise ValueError(f"set_preservation takes a memory holding only a preservation sample: {'; '.join(problems)}")
        self.preservation, self.preservation_source = memory, source if memory is not None else ""
        self.preservation_texts = [(str(p), str(a)) for p, a in texts] if memory is not None else []
        self._base_inverses.clear()

    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> Path:
        """``LearnedEditor.save_pretrained``, plus ``preservation.safetensors`` (and ``preservation_texts.json``, where it
        has them) when the editor holds a preservation sample."""
        from instructedit.io import write_json

        directory = Path(directory)
        own = self.preservation
        if own is None or not self.preservation_texts:  # nor a stale file or entry from a folder or config it was loaded from
            (directory / PRESERVATION_TEXTS).unlink(missing_ok=True)
        if own is None:
            (directory / PRESERVATION_WEIGHTS).unlink(missing_ok=True)
            return super().save_pretrained(directory, {k: v for k, v in (extra or {}).items() if k != "preservation"})
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: c.detach().cpu().contiguous() for name, c in own.text.items()}
        atomic_write(directory / PRESERVATION_WEIGHTS, lambda tmp: save_file(tensors, tmp))
        if self.preservation_texts:
            write_json(directory / PRESERVATION_TEXTS, {"texts": [list(t) for t in self.preservation_texts]})
        about = {"weight": own.text_weight, "tokens": own.text_tokens, "source": self.preservation_source,
                 **({"texts": len(self.preservation_texts)} if self.preservation_texts else {})}
        return super().save_pretrained(directory, (extra or {}) | {"preservation": about})

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> MENDEditor:
        """``LearnedEditor.from_pretrained``, with the preservation sample the folder's config names, if any."""
        editor = super().from_pretrained(directory, device)
        about = read_editor_config(directory).get("preservation")
        if about is None:
            return editor
        path = Path(directory) / PRESERVATION_WEIGHTS
        try:
            tensors = load_file(str(path), device=str(device))
            memory = KeyMemory(past_weight=0.0, text_weight=float(about["weight"]))
        except (OSError, SafetensorError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{directory} holds an incomplete or corrupt editor: its {CONFIG_NAME} names a preservation sample "
                             f"but {path} cannot be read ({type(e).__name__}: {e})") from None
        memory.text, memory.text_tokens = {name: t.float() for name, t in tensors.items()}, int(about.get("tokens", 0))
        texts = read_preservation_texts(directory, about.get("texts"))
        try:
            editor.set_preservation(memory, str(about.get("source", "")), texts)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        logger.info("%s: every edit holds a preservation sample still (weight %g): %s", directory, memory.text_weight, editor.preservation_source)
        return editor

    @contextmanager
    def remembering(self, memory: KeyMemory) -> Iterator[KeyMemory]:
        """Lifelong editing: inside the block every edit solves with ``memory``'s preserved keys (its past edits'
        and its text sample's) and then adds its own keys to it (``editors/aggregation.py``). least_squares only."""
        check_remembers(self)
        previous, self.memory = self.memory, memory
        try:
            yield memory
        finally:
            self.memory = previous

    @torch.no_grad()
    def preserve_text(self, model: nn.Module, memory: KeyMemory, batches: Sequence[TokenBatch], positions: str = "all") -> None:
        """Set ``memory``'s text covariance: the mean kkᵀ, per edited weight, of the layer inputs at every
        non-padding position of ``batches`` (a preservation sample, run through the unedited ``model``);
        ``positions="answer"``: only at the positions that predict a labelled token (the prompt's last and the answer's)."""
        if positions not in PRESERVE_KEYS:
            raise ValueError(f"keys must be {' or '.join(map(repr, PRESERVE_KEYS))}, got {positions!r}")  # key_memory's keys=
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        device = self.edit_lrs.device
        body = getattr(model, "base_model", model)  # the layers alone: the keys are their inputs, the logits not needed
        with capture_factors(model, self.weights) as capture:
            for batch in batches:
                body(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                keep = (batch.attention_mask.bool() if positions == "all" else batch.label_mask).reshape(-1)
                for w in self.weights:
                    keys = capture.inputs[w.name].reshape(-1, capture.inputs[w.name].shape[-1])[keep].to(device, torch.float32)
                    sums[w.name] = keys.T @ keys + sums.get(w.name, 0)
                tokens += int(keep.sum())
        if not tokens:
            raise ValueError("the preservation sample has no tokens")
        memory.text = {name: total / tokens for name, total in sums.items()}
        memory.text_tokens = tokens

    def _accumulate(self, split: SplitModel, chunk: TokenBatch, state: PrefixState | None, systems: dict[str, NormalEquations]) -> torch.Tensor:
        """Fold one chunk of edits into ``systems``; returns the sum of their pre-edit NLLs. Its activations die on return."""
        state = state if state is not None else split.prefix(chunk, final=False)
        with torch.enable_grad(), capture_factors(split.model, self.weights) as capture:
            logits = split.logits_at(split.suffix(state), chunk.label_mask)
            losses = per_row_nll(logits, chunk.labels[chunk.label_mask], chunk.label_rows, chunk.n_label_rows)  # (rows,)
            factors = capture.factors(losses.sum())
        if self.config.ls_keys == "answer":  # only the positions that predict answer tokens
            factors = {name: f.select(chunk.label_mask[f.rows, f.positions]) for name, f in factors.items()}
        for i, w, keys, keys_t, deltas_t in self.network_outputs(factors):
            systems[w.name].add(keys, value_differences(keys, keys_t, deltas_t, self.edit_lrs[i]))
        return losses.detach().sum()

    @torch.no_grad()
    def edits_loss(self, split: SplitModel, batch: TokenBatch, state: PrefixState | ChunkStates | None = None) -> torch.Tensor:
        """``LearnedEditor.edits_loss``; least squares: the mean of each edit's mean NLL, ``editor.chunk_edits`` inputs at a
        time from their chunk states, as ``solve`` reports it."""
        if self.config.aggregation != "least_squares":
            return super().edits_loss(split, batch, state)
        chunks = batch.chunks(self.config.chunk_edits)
        states = state.states if isinstance(state, ChunkStates) else [state if len(chunks) == 1 else None] * len(chunks)
        total = 0
        for chunk, s in zip(chunks, states):
            s = s if s is not None else split.prefix(chunk, final=False)
            logits = split.logits_at(split.suffix(s), chunk.label_mask)
            total = total + per_row_nll(logits, chunk.labels[chunk.label_mask], chunk.label_rows, chunk.n_label_rows).sum()
        return total / batch.n_label_rows

    def round_state(self, split: SplitModel, batch: TokenBatch) -> PrefixState | ChunkStates:
        """``LearnedEditor.round_state``; a least-squares edit of more than ``editor.chunk_edits`` inputs keeps every
        chunk's state (the hidden states entering the first edited block, rows × tokens × d_model, and the blocks'
        arguments): memory that grows with the number of edits, unlike the chunks' activations (256 edits of ~40 tokens on
        the default model: ~25 MB)."""
        chunks = batch.chunks(self.config.chunk_edits) if self.config.aggregation == "least_squares" else [batch]
        if len(chunks) == 1:
            return split.prefix(batch, final=False)
        return ChunkStates(self.config.chunk_edits, [split.prefix(chunk, final=False) for chunk in chunks])

    def edit(self, model: nn.Module | SplitModel, batch: TokenBatch, state: PrefixState | ChunkStates | None = None) -> EditResult:
        """One MEND edit from all rows of ``batch`` (its labelled tokens are the targets); the model is not modified.

        The rows' updates are summed or solved for by least squares, as ``editor.aggregation`` says.
        """
        split = self.split(model)
        mask = batch.label_mask
        if not bool(mask.any()):
            raise ValueError("the edit batch has no target tokens to learn")
        if self.config.aggregation == "least_squares":
            updates, loss, low_rank = self.solve(split, batch, state)
        else:
            factors, loss = self.edit_factors(split, batch, state)
            updates, low_rank = self.transform(factors, with_factors=True)
        if isinstance(updates, ThinUpdates):  # no gradients, thin factors: W + ΔW and ΔW formed only where read
            new_params = ThinParams(split.model, low_rank, updates.transposed)
            return EditResult(new_params=new_params, updates=updates, pre_edit_loss=loss.detach(), low_rank=low_rank)
        return EditResult(new_params=self.edited_params(split, updates), updates=updates, pre_edit_loss=loss.detach(), low_rank=low_rank)

