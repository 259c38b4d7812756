"""The InstructEdit / MEND meta-objective for one batch: edit, score, L = c_edit·L_e + c_loc·L_loc (+ c_margin·L_margin).

DESIGN.md §4. The frozen prefix of the base model runs once per input (``SplitModel.prefix``); the
pre-edit locality logits, the edit gradient, the post-edit edit loss and the post-edit locality all
reuse it, and only the edited blocks are re-run and back-propagated through.

``c_margin`` (0 by default, i.e. DESIGN.md §4 exactly) adds ``losses.locality_margin`` on the
locality positions: a hinge that keeps each pre-edit top-1 answer ahead, which is what the
locality metric counts.
"""

from __future__ import annotations

import torch

from instructedit.editors.mend import MENDEditor
from instructedit.losses import answer_margin, locality_kl, locality_margin, masked_nll, token_accuracy, unchanged_share, unlikelihood
from instructedit.models.split import PrefixState, SplitModel
from instructedit.records import MetaBatch, TokenBatch


def _rows(batch: TokenBatch) -> torch.Tensor:
    """Row index of every labelled position, in ``label_mask`` order."""
    return batch.label_mask.nonzero()[:, 0]


def _scored(split: SplitModel, state: PrefixState, batch: TokenBatch, params: dict | None) -> torch.Tensor:
    return split.logits_at(split.suffix(state, params), batch.label_mask)


def meta_loss(editor: MENDEditor, split: SplitModel, batch: MetaBatch, c_edit: float, c_loc: float, c_margin: float = 0.0,
              c_answer: float = 0.0, answer_cap: float = 2.0) -> tuple[torch.Tensor, dict[str, float]]:
    """One meta-training loss; gradients reach only the MEND network and the step sizes α.

    ``c_answer`` weighs ``losses.answer_margin`` on the edit_outer answer tokens (0: DESIGN.md §4 exactly).
    """
    inner = split.prefix(batch.edit_inner)
    same_outer = torch.equal(batch.edit_outer.input_ids, batch.edit_inner.input_ids)
    outer = inner if same_outer else split.prefix(batch.edit_outer)
    loc = split.prefix(batch.loc)
    with torch.no_grad():
        pre_loc = split.logits_at(loc.final_hidden, batch.loc.label_mask)
        pre_outer = split.logits_at(outer.final_hidden, batch.edit_outer.label_mask)

    edit = editor.edit(split, batch.edit_inner, inner)

    post_outer = _scored(split, outer, batch.edit_outer, edit.new_params)
    outer_targets = batch.edit_outer.labels[batch.edit_outer.label_mask]
    l_edit = masked_nll(post_outer, outer_targets)
    l_answer = answer_margin(post_outer, outer_targets, answer_cap) if c_answer else None
    if batch.unlikely is not None:  # ConvSent: push the opposite sentiment's responses down
        unlikely_state = split.prefix(batch.unlikely)
        post_unlikely = _scored(split, unlikely_state, batch.unlikely, edit.new_params)
        l_edit = l_edit + unlikelihood(post_unlikely, batch.unlikely.labels[batch.unlikely.label_mask])
    post_loc = _scored(split, loc, batch.loc, edit.new_params)
    l_loc = locality_kl(pre_loc, post_loc)
    loss = c_edit * l_edit + c_loc * l_loc
    if l_answer is not None:
        loss = loss + c_answer * l_answer
    l_margin = None
    if c_margin:
        l_margin = locality_margin(pre_loc, post_loc)
        loss = loss + c_margin * l_margin

    n_outer, n_loc = batch.edit_outer.input_ids.shape[0], batch.loc.input_ids.shape[0]
    metrics = {
        "loss": loss.item(),
        "l_edit": l_edit.item(),
        "l_loc": l_loc.item(),
        **({"l_margin": l_margin.item()} if l_margin is not None else {}),
        **({"l_answer": l_answer.item()} if l_answer is not None else {}),
        "pre_edit_loss": float(edit.pre_edit_loss),
        "edit_acc_pre": token_accuracy(pre_outer, outer_targets, _rows(batch.edit_outer), n_outer).mean().item(),
        "edit_acc": token_accuracy(post_outer.detach(), outer_targets, _rows(batch.edit_outer), n_outer).mean().item(),
        "locality": unchanged_share(pre_loc, post_loc.detach(), _rows(batch.loc), n_loc).mean().item(),
    }
    return loss, metrics
