"""KE (Knowledge Editor; De Cao, Aziz and Titov, "Editing Factual Knowledge in Language Models", EMNLP 2021).

A hyper-network conditioned on the edit gates the fine-tuning gradient of each edited weight.

**Edit encoding.** A bidirectional LSTM reads the edit input followed by its new target (the wrapped
prompt and the target tokens) as the base model's own input embeddings; its final states, both
directions concatenated, pass one tanh layer: the condition c (``editor.condition_dim``).

**Update.** For every edited weight W ∈ R^{m×n} (m = d_out, n = d_in) a conditioner
(weight-normalized Linear → tanh → weight-normalized Linear, hidden width ``editor.conditioner_dim``)
maps c to α, β ∈ R^m, γ, δ ∈ R^n and η ∈ R, and (the paper's §3, and ``ConditionedParameter`` of
its code):

    α̂ = softmax(α) γᵀ,    β̂ = softmax(β) δᵀ,
    ΔW = s_W · σ(η) · (α̂ ⊙ ∇_W L(W; x, a) + β̂)

with ∇_W L the gradient of the edit NLL (its mean over the target tokens). With the gradient
factors of ``editors/hooks.py``, ∇_W L = Σ_t g_t u_tᵀ (g_t: output gradient, u_t: input of token t),
so α̂ ⊙ ∇_W L = Σ_t (softmax(α) ⊙ g_t)(γ ⊙ u_t)ᵀ, computed without the dense gradient.
Every edit row of the batch (a record; a ConvSent response) has its own condition, and the rows'
updates are summed, as MEND sums its tokens' (for one edit input this is the paper exactly).

**Where this differs from the paper, and why.**
- s_W is one learned step size per weight (``edit_lrs``, init ``editor.init_edit_lr``) in place of KE's
  constant ``max_scale``: meta-training's step-size optimizer and the generation ``edit_scale`` act on
  it as on MEND's α (ΔW is linear in s_W).
- The LSTM reads the frozen base model's input embeddings instead of a trainable copy of them
  (a vocabulary-sized table per editor); the condition is the edit input and the new target, without
  the model's original prediction (KE's seq2seq setting conditions on ⟨x, y, a⟩).
- Trained with the project's meta-objective (c_edit·L_e + c_loc·L_loc, ``objective.py``), as MEND's
  "KE"/EFK baseline is, instead of KE's constrained (Lagrangian) formulation; ``training.locality_target``
  gives a constraint-like adaptive locality weight if wanted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

from instructedit.config import EditorConfig
from instructedit.editors.base import EditResult
from instructedit.editors.hooks import Factors
from instructedit.editors.learned import LearnedEditor
from instructedit.models.architectures import ArchSpec, EditableWeight
from instructedit.models.split import PrefixState, SplitModel
from instructedit.records import TokenBatch


class EditEncoder(nn.Module):
    """Edit token embeddings (rows, length, d_embed) -> the condition c (rows, condition_dim)."""

    def __init__(self, d_embed: int, lstm_dim: int, condition_dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_embed, lstm_dim, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * lstm_dim, condition_dim)

    def forward(self, embeddings: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(embeddings, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n: (2 directions, rows, lstm_dim)
        return torch.tanh(self.out(torch.cat([h_n[0], h_n[1]], dim=-1)))


class WeightConditioner(nn.Module):
    """c -> (softmax(α), γ, softmax(β), δ, σ(η)) for one weight of shape (d_out, d_in), one set per row of c."""

    def __init__(self, condition_dim: int, hidden: int, d_out: int, d_in: int) -> None:
        super().__init__()
        self.d_out, self.d_in = d_out, d_in
        self.net = nn.Sequential(
            weight_norm(nn.Linear(condition_dim, hidden)),
            nn.Tanh(),
            weight_norm(nn.Linear(hidden, 2 * (d_out + d_in) + 1)),
        )

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        alpha, gamma, beta, delta, eta = self.net(c).split([self.d_out, self.d_in, self.d_out, self.d_in, 1], dim=-1)
        return alpha.softmax(-1), gamma, beta.softmax(-1), delta, torch.sigmoid(eta.squeeze(-1))


class KEEditor(LearnedEditor):
    """Turns one forward/backward on an edit example, and an encoding of the edit, into functional weight updates."""

    method = "ke"

    def __init__(self, weights: list[EditableWeight], config: EditorConfig | None = None, architecture: ArchSpec | None = None,
                 model_name: str = "", embedding_dim: int = 0) -> None:
        super().__init__(weights, config, architecture, model_name)
        if embedding_dim < 1:
            raise ValueError("KEEditor needs the base model's embedding_dim (build it with KEEditor.for_model)")
        if self.config.aggregation != "sum":
            raise ValueError(f"KE sums its edits' updates; editor.aggregation {self.config.aggregation!r} is implemented for MEND only")
        c = self.config
        self.embedding_dim = embedding_dim
        self.encoder = EditEncoder(embedding_dim, c.lstm_dim, c.condition_dim)
        self.conditioners = nn.ModuleList(WeightConditioner(c.condition_dim, c.conditioner_dim, *w.shape) for w in self.weights)
        self.edit_lrs = nn.Parameter(torch.full((len(self.weights),), c.init_edit_lr))

    @classmethod
    def model_dimensions(cls, model: nn.Module) -> dict[str, int]:
        return {"embedding_dim": model.get_input_embeddings().embedding_dim}

    @property
    def dimensions(self) -> dict[str, int]:
        return {"embedding_dim": self.embedding_dim}

    @property
    def network_parameters(self) -> list[nn.Parameter]:
        """What meta-training's first optimizer trains besides the step sizes s_W: the encoder and the conditioners."""
        return list(self.encoder.parameters()) + list(self.conditioners.parameters())

    def _check_model(self, model: nn.Module) -> None:
        super()._check_model(model)
        found = self.model_dimensions(model)["embedding_dim"]
        if found != self.embedding_dim:
            raise ValueError(f"the model's input embeddings have width {found}, this KE editor reads width {self.embedding_dim} "
                             f"(trained for {self.model_name or 'another model'})")

    def encode(self, model: nn.Module, batch: TokenBatch) -> torch.Tensor:
        """The condition c of every row of ``batch`` that carries a target: (edit rows, condition_dim).

        A row's text is its attended input ids and its last target token (``TokenBatch`` inputs stop one
        token short: the last target token is only a label), embedded by the model's own (frozen) table.
        """
        if batch.attention_mask.dim() != 2:
            raise ValueError("KE reads each edit row's own tokens: rows packed into one (a 4-D attention mask) cannot be "
                             "told apart; pass right-padded rows")
        device = self.edit_lrs.device
        label_mask = batch.label_mask
        sequences = []
        for ids, attended, labels, labelled in zip(batch.input_ids, batch.attention_mask.bool(), batch.labels, label_mask):
            if bool(labelled.any()):
                sequences.append(torch.cat([ids[attended], labels[labelled][-1:]]))
        lengths = torch.tensor([len(s) for s in sequences])
        with torch.no_grad():
            embedded = model.get_input_embeddings()(pad_sequence(sequences, batch_first=True))  # (rows, length, d_embed)
        return self.encoder(embedded.to(device=device, dtype=torch.float32), lengths)

    def transform(self, factors: dict[str, Factors], rows: torch.Tensor, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """ΔW = s_W Σ_r σ(η_r)(Σ_{t∈r} (softmax(α_r) ⊙ g_t)(γ_r ⊙ u_t)ᵀ + softmax(β_r) δ_rᵀ), storage orientation.

        ``rows``: for each batch row, its index among the rows of ``c`` (-1 for rows without a target).
        """
        device = self.edit_lrs.device
        updates = {}
        for i, (w, conditioner) in enumerate(zip(self.weights, self.conditioners)):
            a, gamma, b, delta, gate = conditioner(c)  # (R, d_out), (R, d_in), (R, d_out), (R, d_in), (R,)
            f = factors[w.name]
            r = rows[f.rows.to(device)]  # (n_tokens,): each token's condition
            g = f.delta.to(device=device, dtype=torch.float32)  # (n_tokens, d_out)
            u = f.u.to(device=device, dtype=torch.float32)  # (n_tokens, d_in)
            gated = (gate[r, None] * a[r] * g).T @ (gamma[r] * u)  # σ(η)·(α̂ ⊙ ∇W) summed over rows: (d_out, d_in)
            delta_w = gated + (gate[:, None] * b).T @ delta  # + σ(η)·β̂ summed over rows
            updates[w.name] = self.edit_lrs[i] * (delta_w.T if w.transposed else delta_w)
        return updates

    def edit(self, model: nn.Module | SplitModel, batch: TokenBatch, state: PrefixState | None = None) -> EditResult:
        """One KE edit from all rows of ``batch`` (its labelled tokens are the targets); the model is not modified."""
        split = self.split(model)
        factors, loss = self.edit_factors(split, batch, state)
        has_target = batch.label_mask.any(dim=1).to(self.edit_lrs.device)
        rows = torch.where(has_target, torch.cumsum(has_target.long(), 0) - 1, -1)  # batch row -> row of c
        c = self.encode(split.model, batch)
        updates = self.transform(factors, rows, c)
        return EditResult(new_params=self.edited_params(split, updates), updates=updates, pre_edit_loss=loss)
