"""``instructedit calibrate``: choose a trained editor's step-size multiplier for generation on its run's validation split.

The meta-objective is teacher-forced; the step sizes α it learns can leave an edit too weak to win
the first answer token when the edited model decodes by itself, or (multiplied too far) strong
enough to leak into unrelated answers. This tries a few multipliers of α on the run's validation
records (never the test split), keeps the one with the highest generation reliability whose
generation locality is at or above the floor, and writes the editor with α × that multiplier. ``--val-data FILE`` tries
them on another file's records instead (facts worded as the users will ask them; never the evaluation file).

A least-squares editor can also be given a preservation sample (``--preserve``): the key covariance of unrelated
(prompt, answer) texts (the locality prompts of training records, or of ``--preserve-data``) that every solve then
holds still, saved with the editor (``MENDEditor.set_preservation``). It lets larger multipliers keep unrelated
answers, so the multipliers (by default larger ones) are tried with it in place, at every weight given
(``--preserve-weight``), and the (weight, multiplier) pair the same rule prefers is saved.

``--edit-forms wrapped,chat`` makes every edit of the calibrated editor in both forms, solved together: the
instruction-wrapped prompt and the question as a chat user turn (results/analysis/chat-edit-row/); ``plain`` adds the
bare question (no instruction). Reliability is then the mean of the forms' (each reported), and the forms are saved
with the editor (``queries.edit_forms``).

``--rounds 1,2`` also tries each edit made in two rounds, the second on the model the first edited, from the gradient
left: it buys back answer tokens the first round's edit left short (results/analysis/edit-rounds/). The chosen number is
saved (``queries.edit_rounds``) and used wherever the editor makes a single edit. When more than one round wins, the
one-round choice is saved too, as a multiplier of the chosen step sizes (``queries.many_edit_scale``): many edits (more
than 16 in one call, which make rounds of their own, or edits kept one after another) are made at the one-round step
sizes, with which those schedules were fitted (ZsRE, 256 held-out edits: 70.3 % said at the one-round ×3 against 46.5 % at the two-round ×2).

Every cell also measures in-frame locality: another validation record's question, asked in the edit's forms and frame,
keeps its answer (``--in-frame-floor``: the lowest accepted; by default measured only). An edit made in the
instruction's frame changes the answers to other questions asked in that frame far more than the raw locality prompts
show; ``--in-frame-preserve N`` adds such questions (of N training records, or of ``--in-frame-data``, continued with
the unedited model's answers) to the preservation sample at their own weight (``--in-frame-weight``), so the solve holds
their keys still (results/analysis/in-frame-locality/).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from instructedit.calibration import IN_FRAME_WEIGHT
from instructedit.config import ANSWER_STOPS

SCALES, PRESERVED_SCALES = "1,1.5,2,3", "2,3,4,5,6"  # multipliers tried without and with a preservation sample
# the preservation sample's defaults: the recommended editor's (results/least-squares-zsre-smollm2/; weight 1000 chosen)
PRESERVE_RECORDS, PRESERVE_WEIGHTS = 400, "1000,3000,10000"


def add_calibrate_parser(subparsers: Any) -> None:
    """Register ``calibrate`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("calibrate", help="choose an editor's step-size multiplier for generation on its validation split",
                              description="Tries multipliers of the learned step sizes on the run's validation records and writes "
                                          "the editor with the best one (highest generation reliability at or above the locality floor). "
                                          "With --preserve, a least-squares editor also gets a preservation sample that every edit "
                                          "holds still, and each of its weights is tried with every multiplier.")
    p.add_argument("--run", required=True, metavar="DIR", help="a training run folder (config.yaml, best/ or last/)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which editor of the run (default: best)")
    p.add_argument("--scales", default=None,
                   help=f"comma-separated multipliers to try (default {SCALES}; {PRESERVED_SCALES} with a preservation sample)")
    p.add_argument("--locality-floor", type=float, default=0.9, help="lowest generation locality accepted (default 0.9)")
    p.add_argument("--in-frame-floor", type=float, default=0.0,
                   help="lowest in-frame locality accepted: the share of other validation questions, asked in the edit's forms and "
                        "frame, whose answer the edit leaves alone (always measured and reported; default 0: not required)")
    p.add_argument("--in-frame-preserve", type=int, default=None, metavar="N",
                   help="least-squares editors, with --preserve: the preservation sample also holds still the questions of N records "
                        "asked in the editor's edit forms (the wrapped one in the instruction), continued with the unedited model's "
                        "answers, so an edit leaves other questions asked in its frame alone; of the run's training split, or of "
                        "--in-frame-data, never the questions the calibration asks")
    p.add_argument("--in-frame-weight", type=float, default=IN_FRAME_WEIGHT, metavar="W",
                   help=f"the in-frame sample's key covariance counted as W tokens at every --preserve-weight (default {IN_FRAME_WEIGHT:g})")
    p.add_argument("--in-frame-data", default=None, metavar="SOURCES",
                   help="comma-separated sources of the in-frame sample's questions, N records from each: train (the run's "
                        "training split, the default) or data files worded as your users ask (e.g. train,ZsRE's training file; "
                        "never the file you evaluate on)")
    p.add_argument("--output", required=True, metavar="DIR", help="where to write the calibrated editor (a new folder)")
    p.add_argument("--val-size", type=int, default=None, metavar="N",
                   help="validation records to try the multipliers on (default: the run's training.val_size); ConvSent's have no "
                        "single answer and are left out")
    p.add_argument("--val-data", default=None, metavar="FILE",
                   help="try the multipliers on the first --val-size records of FILE (any format the loaders detect; those with a "
                        "locality prompt) instead of the run's validation split: facts worded as the editor's users will ask them "
                        "(e.g. ZsRE's training file for questions); never the file you evaluate on")
    p.add_argument("--preserve", type=int, default=None, metavar="N",
                   help="least-squares editors: every solve of the calibrated editor holds still the keys of a preservation sample, "
                        "the locality prompts + answers of the first N records with one of the run's training split (or of "
                        f"--preserve-data), saved with the editor (default {PRESERVE_RECORDS} when only --preserve-data is given)")
    p.add_argument("--preserve-data", default=None, metavar="FILE",
                   help="take the preservation sample from FILE (any format the loaders detect) instead of the training split; "
                        "never from data you evaluate on")
    p.add_argument("--preserve-weight", default=None, metavar="W[,W...]",
                   help="the sample's mean key covariance counted as W tokens in every solve; several: each is tried with every "
                        f"multiplier and the best pair kept (default {PRESERVE_WEIGHTS})")
    p.add_argument("--edit-forms", default=None, metavar="FORMS",
                   help="comma-separated forms each edit is made in, solved together: wrapped, plain (the bare question, no "
                        "instruction), chat (the question as a chat user turn); saved with the calibrated editor (default: the "
                        "run's training.edit_forms)")
    p.add_argument("--answer-stop", default=None, choices=ANSWER_STOPS,
                   help="what each edit input's answer ends with: newline+turn also ends the chat form's answer with the chat "
                        "template's end of turn, so the edited model closes its turn after the answer; newline+end also ends "
                        "the wrapped and bare answers with EOS after the newline, so the text ends there; saved with the "
                        "calibrated editor (default: the run's training.answer_stop)")
    p.add_argument("--rounds", default="1", metavar="K[,K...]",
                   help="the rounds a single edit is made in, each after the first made on the model the earlier ones edited; "
                        "several: each is tried with every multiplier (and weight) and the best kept, fewer on a tie; saved with "
                        "the calibrated editor (queries.edit_rounds: apply, edit and evaluate make its edits so; default 1); when more "
                        "than one round wins, the one-round multiplier is saved for many edits in one call (queries.many_edit_scale)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--restart", action="store_true",
                   help="score every cell of the grid again, ignoring those an interrupted run of the same calibration kept in "
                        "OUTPUT.partial.json (by default the run resumes from them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_calibrate)


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--scales {text!r} must be comma-separated numbers, e.g. 1,1.5,2") from None
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"--scales {text!r} needs positive multipliers")
    return scales


def parse_rounds(text: str) -> list[int]:
    """``--rounds 1,2``: whole numbers >= 1."""
    try:
        rounds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--rounds {text!r} must be comma-separated whole numbers, e.g. 1,2") from None
    if not rounds or any(r < 1 for r in rounds):
        raise ValueError(f"--rounds {text!r} needs numbers >= 1")
    return rounds


def check_preservation_arguments(args: argparse.Namespace) -> bool:
    """Whether a preservation sample is asked for (--preserve or --preserve-data); --preserve-weight only with one; fills in
    the defaults."""
    wanted = args.preserve is not None or args.preserve_data is not None
    if args.preserve_weight is not None and not wanted:
        raise ValueError("--preserve-weight: the preservation sample needs --preserve N (the run's training split) or --preserve-data FILE")
    args.preserve = PRESERVE_RECORDS if args.preserve is None else args.preserve
    text = PRESERVE_WEIGHTS if args.preserve_weight is None else args.preserve_weight
    try:
        args.preserve_weight = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--preserve-weight {text!r} must be comma-separated numbers, e.g. 200,1000") from None
    if args.preserve < 1 or not args.preserve_weight or any(w <= 0 for w in args.preserve_weight):
        raise ValueError(f"--preserve must be >= 1 and --preserve-weight positive numbers, got {args.preserve} and {text!r}")
    if args.preserve_data is not None and not Path(args.preserve_data).is_file():
        raise FileNotFoundError(f"--preserve-data {args.preserve_data}: no such file")
    return wanted


def run_calibrate(args: argparse.Namespace) -> int:
    from instructedit.calibration import IN_FRAME_TRAIN, calibrate, in_frame_sources

    preserve = check_preservation_arguments(args)
    files = [("--val-data", args.val_data)]
    if args.in_frame_data is not None:
        files += [("--in-frame-data", name) for name in in_frame_sources(args.in_frame_data) if name != IN_FRAME_TRAIN]
    for flag, path in files:
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    if args.in_frame_data is not None and args.in_frame_preserve is None:
        raise ValueError("--in-frame-data: the in-frame sample needs --in-frame-preserve N")
    scales = parse_scales(args.scales if args.scales is not None else PRESERVED_SCALES if preserve else SCALES)
    calibrate(args.run, args.output, scales, checkpoint=args.checkpoint, locality_floor=args.locality_floor, val_size=args.val_size,
              preserve=args.preserve if preserve else None, preserve_weights=args.preserve_weight, preserve_data=args.preserve_data,
              edit_forms=args.edit_forms, device=args.device, val_data=args.val_data, answer_stop=args.answer_stop,
              progress=not args.no_progress, rounds=parse_rounds(args.rounds), restart=args.restart, in_frame_floor=args.in_frame_floor,
              in_frame=args.in_frame_preserve, in_frame_weight=args.in_frame_weight, in_frame_data=args.in_frame_data)
    return 0
