"""Least-squares aggregation of many edits (MALMEN; DESIGN.md §9): one ridge-regression shift per weight.

Derivation for this project's network. MEND's update of a weight W (output orientation, d_out × d_in)
from the answer tokens of one call is ΔW = α Σ_i δ̃_i ũ_iᵀ: one rank-1 term per token i, with ũ_i, δ̃_i
the network's outputs for the token's layer input k_i (the key, = u_i) and output gradient δ_i, and α
the learned step size of W (negative after training: α carries the descent direction). Token i's own
term changes the layer's output at its own key by

    d_i = α δ̃_i (ũ_iᵀ k_i) = α (k_i · ũ_i) δ̃_i        (d_out,)

— the value change the network asks for there (MALMEN's d_i = −η (k_i·k̃_i) g̃_i with this sign
convention). The sum also changes token j's output by the cross terms α (k_j · ũ_i) δ̃_i, i ≠ j: the
edits' interference, which grows with their number. Least squares asks one shift to produce every d_i
at its own key and nothing else:

    S = argmin_S ‖K S − D‖² + e^λ ‖S‖² = (KᵀK + e^λ I)⁻¹ KᵀD,    ΔW = Sᵀ

with K (n_tokens × d_in) the keys, D (n_tokens × d_out) the value changes and λ learned per weight
(init 0); for GPT-2's Conv1D, which stores W transposed, S is the stored update itself. The δ_i come
from the sum over edits of each edit's mean answer NLL, so that every edit asks for what it would ask
alone (one mean over all the call's tokens would shrink every d_i by the number of edits).

Which tokens (``editor.ls_keys``). The gradient reaches every position of the edit input up to its last
answer token, so by default ("all") K holds the prompt's keys too, with the value changes the network asks
for there. Edit inputs wrapped in one instruction template share its tokens, and below the edited blocks a
shared prefix has identical keys: N edits in one call then ask N different changes at one key, which the
solve averages, and every edit's prompt keys pull its shift towards none. "answer" fits only the positions
that predict answer tokens: measured with the least-squares editor on 256 ZsRE training-split edits in one
call, reliability rises from 41 to 73 % (teacher-forced) and 6 to 36 % (said), while locality falls (75 to
52 %); a preservation sample's keys (``KeyMemory`` text, below) buy locality back at some reliability. On 256
held-out edits in one call, answer keys with a preservation sample weighted 200: reliability 61.7 % teacher-forced and
14.5 % said against 50.3 and 7.8, locality 79 / 84 % against 75 / 77; an editor meta-trained with answer keys keeps
87 % (teacher-forced) and 55 % (said) of its single-edit reliability there (``results/analysis/ls-keys/``). Single
edits do best with "all".

Lifelong editing (``KeyMemory``): one call's shift also moves the outputs at the keys of every earlier edit
and of ordinary text, which is how sequential edits erase each other and the model's other knowledge
(measured: the plain solve collapses by 64 sequential edits). With a memory, the solve also asks the shift
to leave those keys alone (MEMIT's preserved-key covariance; AlphaEdit and UltraEdit build lifelong
editing on the same idea):

    S = argmin ‖K S − D‖² + ‖K_past S‖² + w ‖K_text S‖²/n_text + e^λ ‖S‖²
      = (KᵀK + K_pastᵀK_past + w C_text + e^λ I)⁻¹ KᵀD

with K_past the answer-token keys of the edits made so far (their KᵀK, summed after every call: no
extra pass) and C_text the mean key covariance of a preservation text sample, weighted as ``w`` tokens.

KᵀK and KᵀD are sums over tokens, so ``NormalEquations`` accumulates them chunk by chunk: besides one
chunk, the solve holds O(d_in² + d_in·d_out) numbers whatever the number of edits. Everything is
differentiable (autograd through ``torch.linalg.solve``), so meta-training learns the network, α and λ
through the solve.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch


def value_differences(keys: torch.Tensor, keys_t: torch.Tensor, deltas_t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """d_i = α (k_i · ũ_i) δ̃_i for every token: keys, keys_t (n_tokens, d_in), deltas_t (n_tokens, d_out) -> (n_tokens, d_out)."""
    return lr * (keys * keys_t).sum(-1, keepdim=True) * deltas_t


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, log_lambda: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
    """(KᵀK + P + e^λ I)⁻¹ KᵀD from gram = KᵀK (d_in, d_in), cross = KᵀD (d_in, d_out) and ``prior`` P (d_in, d_in,
    the preserved keys' covariance of a ``KeyMemory``; None: none) -> S (d_in, d_out)."""
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    system = gram + log_lambda.exp() * eye
    return torch.linalg.solve(system if prior is None else system + prior.to(system.dtype), cross)


def base_inverse(log_lambda: torch.Tensor, prior: torch.Tensor) -> torch.Tensor | None:
    """B⁻¹ for B = P + e^λ I (float64 up to d_in 4096, else P's dtype; through its Cholesky factor), which every solve with
    this ``prior`` P and λ shares (``push_through_left``); None where B is not numerically positive definite.

    Returned row-major: ``torch.cholesky_inverse`` gives a column-major (transposed) result, and B⁻¹ · Kᵀ read from it
    took 30-77 ms at d_in 1536 and 3-8 tokens against 2-4 ms row-major (one thread, AMD EPYC): 44 ms of every edit's
    down-projection solve, three per edit of the recommended editor (18 % of a teacher-forced evaluation's time)."""
    dtype = torch.float64 if prior.shape[0] <= 4096 else prior.dtype
    system = prior.to(dtype) + log_lambda.detach().to(dtype).exp() * torch.eye(prior.shape[0], dtype=dtype, device=prior.device)
    factor, info = torch.linalg.cholesky_ex(system)
    return torch.cholesky_inverse(factor).contiguous() if int(info) == 0 else None


def push_through_left(keys: torch.Tensor, log_lambda: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """(KᵀK + B)⁻¹ Kᵀ (d_in, n_tokens) as B⁻¹Kᵀ (I + K B⁻¹Kᵀ)⁻¹: an n_tokens-sized solve instead of a d_in-sized one.

    B = e^λ I without ``inverse`` (then it is Kᵀ (KKᵀ + e^λ I)⁻¹), else the B whose inverse ``inverse`` is
    (``base_inverse``: made once for every solve with the same prior). Computed in float64 (returned in the keys'
    dtype): for a few tokens it costs a few milliseconds where factorizing the d_in × d_in system costs 62 ms at
    d_in 1536 (the default model's down projection, one thread), and it is closer to the exact solution than that
    float32 factorization (error 4e-10 against 1e-8 there). B⁻¹ is applied as a matrix product: ``torch.cholesky_solve``
    copies its factor on every call (20 ms at d_in 1536). Not used under autograd: ``ridge_solve`` is."""
    dtype = inverse.dtype if inverse is not None else torch.float64
    k = keys.to(dtype)
    eye = torch.eye(k.shape[0], dtype=dtype, device=k.device)
    if inverse is None:
        return torch.linalg.solve(k @ k.T + log_lambda.detach().to(dtype).exp() * eye, k).T.to(keys.dtype)
    scaled = inverse @ k.T  # B⁻¹Kᵀ (d_in, n)
    return torch.linalg.solve(eye + k @ scaled, scaled.T).T.to(keys.dtype)  # I + K B⁻¹Kᵀ is symmetric


class NormalEquations:
    """KᵀK and KᵀD of one weight's ridge regression, summed over chunks of tokens as they arrive.

    While the tokens are few (the thin factors below cost at most half of S to apply: n·(d_in + d_out) ≤
    d_in·d_out / 2), K and D themselves are kept too: the solution is then the product of two thin factors,
    S = [(KᵀK + P + e^λ I)⁻¹ Kᵀ] · D (``solve_factors``), rank ≤ n_tokens, which one edit's answers can be
    decoded with cheaply (``row_edits``: n·(d_in + d_out) per row instead of d_in·d_out).
    """

    def __init__(self) -> None:
        self._gram: torch.Tensor | None = None  # (d_in, d_in), the chunks folded in so far
        self._cross: torch.Tensor | None = None  # (d_in, d_out)
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # chunks not folded in yet (only while ``kept``)
        self.n_tokens = 0
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []  # (keys, values) per chunk while the tokens are few

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fold in one chunk: keys (n, d_in), values (n, d_out). Out of place, so autograd sees every chunk.

        While the tokens are few the chunk is only kept: KᵀK and KᵀD are formed when first read (``gram``, ``cross``), so
        a solve from thin factors (``solve_factors``) never makes them (two d_in-sized products per weight and edit,
        memory-bound at a few tokens). Once the tokens are many, every chunk is folded in as it arrives (the memory of a
        call does not grow with its edits)."""
        self.n_tokens += keys.shape[0]
        self._pending.append((keys, values))
        if self.kept is not None:
            d_in, d_out = keys.shape[1], values.shape[1]
            self.kept = self.kept + [(keys, values)] if 2 * self.n_tokens * (d_in + d_out) <= d_in * d_out else None
        if self.kept is None:
            self._fold()

    def _fold(self) -> None:
        for keys, values in self._pending:
            gram, cross = keys.T @ keys, keys.T @ values
            self._gram = gram if self._gram is None else self._gram + gram
            self._cross = cross if self._cross is None else self._cross + cross
        self._pending = []

    @property
    def gram(self) -> torch.Tensor | None:
        """KᵀK (d_in, d_in) of every chunk added so far; None before the first."""
        self._fold()
        return self._gram

    @property
    def cross(self) -> torch.Tensor | None:
        """KᵀD (d_in, d_out) of every chunk added so far; None before the first."""
        self._fold()
        return self._cross

    def solve(self, log_lambda: torch.Tensor, prior: torch.Tensor | None = None, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The ridge solution S (d_in, d_out) of every chunk added so far (``prior``: see ``ridge_solve``); ``offset``
        (d_in, d_out) is taken from KᵀD first (anchored rounds: P A, A the shift earlier rounds made)."""
        if self.gram is None or self.cross is None:
            raise ValueError("no tokens were added to the normal equations")
        return ridge_solve(self.gram, self.cross if offset is None else self.cross - offset, log_lambda, prior)

    def solve_factors(self, log_lambda: torch.Tensor, prior: torch.Tensor | None = None,
                      inverse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(left (d_in, n_tokens), right (n_tokens, d_out)) whose product is ``solve``'s S, or None once the tokens are many.

        Without a ``prior``, or with ``inverse`` (``base_inverse`` of that prior and λ), left comes from an n_tokens-sized
        solve (``push_through_left``); with a prior alone, from the d_in-sized system."""
        if not self.n_tokens or not self.kept:
            return None if self.n_tokens else self.solve(log_lambda, prior)  # no tokens: raises
        keys, values = (torch.cat(parts) for parts in zip(*self.kept))
        if prior is None or inverse is not None:
            return push_through_left(keys, log_lambda, inverse), values
        return ridge_solve(self.gram, keys.T, log_lambda, prior), values


class KeyMemory:
    """The keys a least-squares editor keeps still while it edits one call after another (see the module docstring).

    ``past``: weight name -> Σ kkᵀ of the answer-token keys of every edit call made with this memory
    (``MENDEditor.remembering``); ``text``: weight name -> mean kkᵀ of a preservation sample
    (``MENDEditor.preserve_text``), counted as ``text_weight`` tokens; ``past_weight`` scales the past keys.
    """

    def __init__(self, past_weight: float = 1.0, text_weight: float = 0.0) -> None:
        if past_weight < 0 or text_weight < 0:
            raise ValueError(f"KeyMemory weights must be >= 0, got past_weight={past_weight}, text_weight={text_weight}")
        self.past_weight, self.text_weight = float(past_weight), float(text_weight)
        self.past: dict[str, torch.Tensor] = {}
        self.text: dict[str, torch.Tensor] = {}
        self._before_last: tuple[dict[str, torch.Tensor], int] | None = None  # what ``forget_last`` puts back
        self._deferred: list[dict[str, torch.Tensor]] | None = None  # inside ``as_one_call``: the last solve's keys
        self.calls = 0
        self.text_tokens = 0

    def prior(self, name: str, past: bool = True) -> torch.Tensor | None:
        """P of weight ``name`` for the next solve: past_weight · Σ K_pastᵀK_past + text_weight · C_text (None if empty);
        ``past=False``: the sample's term alone (what anchored solves hold to the original weights)."""
        terms = []
        if past and self.past_weight and name in self.past:
            terms.append(self.past_weight * self.past[name])
        if self.text_weight and name in self.text:
            terms.append(self.text_weight * self.text[name])
        # the sample may have been taken on another device than the edits' keys (an editor moved to the model's GPU after
        # ``preserve_text``): summed where the first term lives (the caller moves the sum to the solve's device)
        terms = [t.to(terms[0].device) for t in terms]
        return sum(terms[1:], terms[0]) if terms else None

    def remember(self, grams: dict[str, torch.Tensor]) -> None:
        """Add one edit call's KᵀK per weight (detached: earlier edits are fixed); at ``past_weight`` 0 only the call is counted
        (no solve reads the sum: ``analyze batch`` rolls every call back). Inside ``as_one_call``: kept for its end."""
        if self._deferred is not None:
            self._deferred[:] = [grams]
            return
        self._before_last = (dict(self.past), self.calls)  # the sums are replaced, never written in place: references suffice
        if self.past_weight:
            for name, gram in grams.items():
                gram = gram.detach()
                self.past[name] = gram.clone() if name not in self.past else self.past[name].to(gram.device) + gram
        self.calls += 1

    @contextlib.contextmanager
    def as_one_call(self) -> Iterator[KeyMemory]:
        """Inside the block, the solves count as one edit call (an edit made in rounds): each holds the earlier calls'
        keys as the block found them, not its own earlier rounds' (which it would hold still against itself), and the last
        solve's keys are remembered once, at the block's end (``forget_last`` then forgets them); nothing if it raises."""
        if self._deferred is not None:
            raise RuntimeError("KeyMemory.as_one_call: already inside one")
        self._deferred = []
        try:
            yield self
            grams = self._deferred
        finally:
            self._deferred = None
        if grams:
            self.remember(grams[0])

    def forget_last(self) -> None:
        """Undo the last ``remember`` (an edit call that was not kept: its keys are not the model's to hold), bit for bit;
        only the last one can be forgotten."""
        if self._before_last is None:
            raise RuntimeError("KeyMemory.forget_last: no edit call to forget since the last one was forgotten")
        self.past, self.calls = self._before_last
        self._before_last = None

    def state(self) -> dict[str, float | int]:
        """What a results file records about the memory."""
        return {"past_weight": self.past_weight, "text_weight": self.text_weight, "text_tokens": self.text_tokens,
                "calls_remembered": self.calls}


def with_sample(text: dict[str, torch.Tensor], weight: float, extra: dict[str, torch.Tensor], extra_weight: float) -> dict[str, torch.Tensor]:
    """Two preservation samples as one counted as ``weight`` tokens: each is a mean key covariance per weight name, counted
    as its own weight, so w·C + w_x·C_x = w·(C + w_x/w·C_x) (``extra`` moved to ``text``'s devices)."""
    return {k: text[k] + extra_weight / weight * extra[k].to(text[k].device) for k in text}


def check_remembers(editor: Any) -> None:
    """A key memory is held still by a least-squares MEND editor's solves (``MENDEditor.remembering``); any other editor is
    refused, before any work is done."""
    if not hasattr(editor, "remembering"):
        raise ValueError(f"a key memory needs a least-squares MEND editor; this one is {type(editor).__name__}")
    aggregation = getattr(getattr(editor, "config", None), "aggregation", "least_squares")
    if aggregation != "least_squares":
        raise ValueError(f"a key memory needs an editor with editor.aggregation least_squares; this one is {aggregation!r}")


def remembering(editor: Any, memory: KeyMemory | None) -> AbstractContextManager:
    """``editor.remembering(memory)``: its solves hold the memory's keys still inside the block; nothing without a memory."""
    if memory is None:
        return contextlib.nullcontext()
    check_remembers(editor)
    return editor.remembering(memory)
