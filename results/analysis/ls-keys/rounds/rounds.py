"""Experiment: N edits in one call made in ROUNDS solves, each on the model the previous rounds edited, with the editor's
preservation sample weighted PRESERVE_SCALE times (a number, sqrt = sqrt(N), n = N) in every solve.

Round r's network sees the gradients of the edits on the model after rounds 1..r-1: an edit already said asks for
little, one the least-squares compromise shrank asks again. The rounds are rolled back together (last first).

    OMP_NUM_THREADS=1 .venv/bin/python results/analysis/ls-keys/rounds/rounds.py ROUNDS PRESERVE_SCALE \
        --editor runs/ls8-answer/calibrated --task zsre --split train --sizes 256 --no-progress --output FILE.json
"""

import math
import sys

from instructedit.editors import learned, mend

rounds, mode, rest = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
orig_solve, orig_prior, orig_apply = mend.MENDEditor.solve, mend.MENDEditor._prior, learned.LearnedEditor.apply


def solve(self, split, batch, state=None):
    self._n_call = batch.n_label_rows
    return orig_solve(self, split, batch, state)


def _prior(self, name):
    p = orig_prior(self, name)
    n = getattr(self, "_n_call", 1)
    factor = {"n": float(n), "sqrt": math.sqrt(n)}[mode] if mode in ("n", "sqrt") else float(mode)
    return p if p is None else p * factor


def _preservation_inverse(self, i, name):
    return None  # the scaled prior goes through the d_in-sized solve


class Rounds:
    def __init__(self, handles):
        self.handles = handles

    def rollback(self):
        for h in reversed(self.handles):
            h.rollback()


def apply(self, model, batch):
    return Rounds([orig_apply(self, model, batch) for _ in range(rounds)])


mend.MENDEditor.solve, mend.MENDEditor._prior, mend.MENDEditor.apply = solve, _prior, apply
mend.MENDEditor._preservation_inverse = _preservation_inverse
from instructedit.cli import main  # noqa: E402

sys.argv = ["instructedit", "analyze", "batch", *rest]
sys.exit(main())
