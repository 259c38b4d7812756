"""``instructedit analyze batch`` with every multi-round call anchored (``LearnedEditor.apply(anchored=True)``): each
round after the first solves with the preservation sample's keys held to the ORIGINAL weights' outputs, not to the last
round's. Runs the command given after ``--`` unchanged otherwise (kept as run; README.md beside it, "Anchored rounds").

    OMP_NUM_THREADS=1 .venv/bin/python results/analysis/ls-keys/rounds/anchored/anchored.py -- analyze batch ... --output FILE.json
"""

import sys

from instructedit.analysis import many_edits
from instructedit.cli import main
from instructedit.editors.learned import check_rounds, sample_weighted


def anchored_rounds(editor, model, batch, rounds=1, sample_weight=None, progress=False):
    """``editors.learned.apply_in_rounds`` with ``anchored=True``."""
    check_rounds(editor, rounds)
    with sample_weighted(editor, sample_weight):
        return editor.apply(model, batch) if rounds == 1 else editor.apply(model, batch, rounds=rounds, progress=progress, anchored=True)


many_edits.apply_in_rounds = anchored_rounds
sys.exit(main(sys.argv[sys.argv.index("--") + 1 :]))
