"""Experiment: the editor's own preservation sample scaled with the number of edits in one call (N, sqrt N, or 1)."""
import math, sys
from instructedit.editors import mend
mode, rest = sys.argv[1], sys.argv[2:]
orig_solve, orig_prior = mend.MENDEditor.solve, mend.MENDEditor._prior
def solve(self, split, batch, state=None):
    self._n_call = batch.n_label_rows
    return orig_solve(self, split, batch, state)
def _prior(self, name):
    p = orig_prior(self, name)
    n = getattr(self, "_n_call", 1)
    factor = {"1": 1.0, "n": float(n), "sqrt": math.sqrt(n)}[mode]
    return p if p is None else p * factor
mend.MENDEditor.solve, mend.MENDEditor._prior = solve, _prior
from instructedit.cli import main
sys.argv = ["instructedit", "analyze", "batch", *rest]
sys.exit(main())
