"""``instructedit analyze sequential`` with every edit call anchored: before each call ``MENDEditor.anchor`` is set to the
shift the sequence has made so far, so the call's solve holds the preservation sample's keys to the ORIGINAL model's
outputs, not to the current model's (the earlier edits' keys are still held to the current weights). Runs the command
given after ``--`` unchanged otherwise (kept as run; README.md of ``..``, "Anchored to the original model").

    OMP_NUM_THREADS=1 .venv/bin/python results/analysis/lifelong-recommended/dev-anchored/anchored_seq.py -- analyze sequential ... --output FILE.json
"""

import sys

import torch

from instructedit.cli import main
from instructedit.editors.mend import MENDEditor

plain_apply = MENDEditor.apply
originals: dict[str, torch.Tensor] = {}  # the edited weights before the first call of the sequence


def anchored_apply(self, model, batch, *args, **kwargs):
    params = {w.name: model.get_parameter(w.name) for w in self.weights}
    if not originals:
        originals.update({n: p.detach().clone() for n, p in params.items()})
    self.anchor = {n: p.detach().float() - originals[n].float() for n, p in params.items()}
    try:
        return plain_apply(self, model, batch, *args, **kwargs)
    finally:
        self.anchor = None


MENDEditor.apply = anchored_apply
sys.exit(main(sys.argv[sys.argv.index("--") + 1 :]))
