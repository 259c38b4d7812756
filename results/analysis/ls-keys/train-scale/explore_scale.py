"""`instructedit analyze batch` with the loaded editor's step sizes α multiplied by SCALE (kept as run, 2026-12-01).

A least-squares shift is linear in the value changes the network asks for, and those are linear in α: SCALE × α is
the solve asked SCALE times as hard, for every edit alone and for every N-edit call alike. Used on ZsRE's TRAIN split
(no test case) to choose a multiplier, and once on the held-out file with the multiplier so chosen
(`../capacity-ls8-answer-x2-w200.*`). The JSON's "command" records the analyze-batch arguments, not SCALE: the file
name carries it (train-x2.0.json: SCALE 2; -w200: --key-memory --preserve-weight 200).

    OMP_NUM_THREADS=1 .venv/bin/python results/analysis/ls-keys/train-scale/explore_scale.py 2.0 \
        --editor runs/ls8-answer/best --task zsre --split train --sizes 256 --singles --no-progress \
        [--key-memory --preserve-data ../shared/data/zsre/zsre_mend_train-1k.json --preserve-start 300 --preserve 400 \
         --preserve-weight 200] --output results/analysis/ls-keys/train-scale/train-x2.0[-w200].json
"""

import sys

import torch

from instructedit.cli import main
from instructedit.editors.mend import MENDEditor

scale = float(sys.argv[1])
_load = MENDEditor.from_pretrained.__func__


def _scaled(cls, *args, **kwargs):
    editor = _load(cls, *args, **kwargs)
    with torch.no_grad():
        editor.edit_lrs.mul_(scale)
    return editor


MENDEditor.from_pretrained = classmethod(_scaled)
sys.exit(main(["analyze", "batch", *sys.argv[2:]]))
