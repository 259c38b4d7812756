"""``instructedit analyze sequential`` with every solve confined, nearly, to what the preservation sample leaves free
(AlphaEdit's null-space projection, as a prior): per edited weight, the eigenvectors U of the sample's key covariance
C that carry ``ENERGY`` of its trace get a penalty ``STRENGTH`` × the sample's weight × C's largest eigenvalue, i.e.
P += h · U Uᵀ, so the update S keeps off them (S ≈ (I − U Uᵀ) S in the limit); the tail directions stay as free as
the ridge leaves them. Runs the command given after ``--`` unchanged otherwise (kept as run; README.md of ``..``).

    ENERGY=0.99 STRENGTH=100 OMP_NUM_THREADS=1 .venv/bin/python results/analysis/lifelong-recommended/dev-nullspace/nullspace_seq.py \
        -- analyze sequential ... --key-memory --preserve-data FILE ... --output FILE.json
"""

import os
import sys

import torch

from instructedit.cli import main
from instructedit.editors.mend import MENDEditor

ENERGY = float(os.environ.get("ENERGY", "0.99"))
STRENGTH = float(os.environ.get("STRENGTH", "100"))
plain_prior = MENDEditor._prior
projectors: dict[tuple[int, str], torch.Tensor] = {}


def projector(memory, name: str) -> torch.Tensor:
    key = (id(memory), name)
    if key not in projectors:
        cov = memory.text[name].double()
        values, vectors = torch.linalg.eigh(cov)  # ascending
        values, vectors = values.flip(0), vectors.flip(1)
        share = values.clamp(min=0).cumsum(0) / values.clamp(min=0).sum()
        top = int((share < ENERGY).sum()) + 1
        u = vectors[:, :top]
        h = STRENGTH * memory.text_weight * float(values[0])
        projectors[key] = (h * (u @ u.T)).float()
        print(f"{name}: held {top} of {cov.shape[0]} directions ({ENERGY:.4g} of the sample's key energy), penalty {h:.3g}; "
              f"free: {cov.shape[0] - top}", file=sys.stderr, flush=True)
    return projectors[key]


def projected_prior(self, name: str, past: bool = True):
    prior = plain_prior(self, name, past)
    memory = self.memory
    if memory is None or not memory.text_weight or name not in memory.text:
        return prior
    hard = projector(memory, name).to(self.edit_lrs.device)
    return hard if prior is None else prior + hard


MENDEditor._prior = projected_prior
sys.exit(main(sys.argv[sys.argv.index("--") + 1 :]))
