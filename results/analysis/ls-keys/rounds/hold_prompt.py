"""Experiment: a least-squares call fits the answer positions' keys (``ls_keys: answer``) and holds the edit inputs' other
keys (their prompt and instruction-template positions) still (D = 0 there), each counted as PROMPT_WEIGHT tokens: the
shift should change the outputs where answers are predicted and nowhere else in a question.

    OMP_NUM_THREADS=1 .venv/bin/python results/analysis/ls-keys/rounds/hold_prompt.py PROMPT_WEIGHT --editor runs/ls8-answer/calibrated \
        --task zsre --split train --sizes 64 --rounds 4 --sample-weight 8000 --no-progress --output FILE.json
"""
import math
import sys

import torch

from instructedit.editors import mend
from instructedit.editors.aggregation import value_differences
from instructedit.editors.hooks import capture_factors
from instructedit.losses import per_row_nll

weight = float(sys.argv[1])


def _accumulate(self, split, chunk, state, systems):
    state = state if state is not None else split.prefix(chunk, final=False)
    with torch.enable_grad(), capture_factors(split.model, self.weights) as capture:
        logits = split.logits_at(split.suffix(state), chunk.label_mask)
        losses = per_row_nll(logits, chunk.labels[chunk.label_mask], chunk.label_rows, chunk.n_label_rows)
        factors = capture.factors(losses.sum())
    held = {}
    if self.config.ls_keys == "answer":
        answer = {name: chunk.label_mask[f.rows, f.positions] for name, f in factors.items()}
        held = {name: f.u[~answer[name]] for name, f in factors.items()}
        factors = {name: f.select(answer[name]) for name, f in factors.items()}
    for i, w, keys, keys_t, deltas_t in self.network_outputs(factors):
        systems[w.name].add(keys, value_differences(keys, keys_t, deltas_t, self.edit_lrs[i]))
        if w.name in held and held[w.name].shape[0]:
            k = held[w.name].to(keys.dtype) * math.sqrt(weight)
            systems[w.name].add(k, k.new_zeros(k.shape[0], deltas_t.shape[1]))
    return losses.detach().sum()


mend.MENDEditor._accumulate = _accumulate
from instructedit.cli import main  # noqa: E402

sys.argv = ["instructedit", "analyze", "batch", *sys.argv[2:]]
sys.exit(main())
