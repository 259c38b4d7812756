"""``instructedit calibrate``: choose a trained editor's step-size multiplier for generation on its run's validation split.

The meta-objective is teacher-forced; the step sizes α it learns can leave an edit too weak to win
the first answer token when the edited model decodes by itself, or (multiplied too far) strong
enough to leak into unrelated answers. This tries a few multipliers of α on the run's validation
records (never the test split), keeps the one with the highest generation reliability whose
generation locality is at or above the floor, and writes the editor with α × that multiplier.

A least-squares editor can also be given a preservation sample (``--preserve``): the key covariance of unrelated
(prompt, answer) texts (the locality prompts of training records, or of ``--preserve-data``) that every solve then
holds still, saved with the editor (``MENDEditor.set_preservation``). It lets larger multipliers keep unrelated
answers, so the multipliers (by default larger ones) are tried with it in place, at every weight given
(``--preserve-weight``), and the (weight, multiplier) pair the same rule prefers is saved.

``--edit-forms wrapped,chat`` makes every edit of the calibrated editor in both forms, solved together: the
instruction-wrapped prompt and the question as a chat user turn (results/analysis/chat-edit-row/); reliability is then the
mean of both forms' (each reported), and the forms are saved with the editor (``queries.edit_forms``).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

from instructedit.io import write_json
from instructedit.records import EditRecord
from instructedit.runs import CONFIG, EDITOR_CONFIG

logger = logging.getLogger(__name__)

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
    p.add_argument("--output", required=True, metavar="DIR", help="where to write the calibrated editor (a new folder)")
    p.add_argument("--val-size", type=int, default=None, metavar="N",
                   help="validation records to try the multipliers on (default: the run's training.val_size); ConvSent's have no "
                        "single answer and are left out")
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
                   help="comma-separated forms each edit is made in, solved together: wrapped, chat (the question as a chat user "
                        "turn); saved with the calibrated editor (default: the run's training.edit_forms)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.set_defaults(func=run_calibrate)


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--scales {text!r} must be comma-separated numbers, e.g. 1,1.5,2") from None
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"--scales {text!r} needs positive multipliers")
    return scales


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


def preservation_texts(records: list[EditRecord], count: int, where: str) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs of the locality prompts of the first ``count`` of ``records`` that have one (``where``
    names them in an error)."""
    from instructedit.analysis.many_edits import locality_texts

    texts = locality_texts([r for r in records if r.locality][:count])
    if not texts:
        raise ValueError(f"{where}: no record has a locality prompt to preserve")
    return texts


def run_calibrate(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from instructedit.analysis.many_edits import key_memory
    from instructedit.api import query_setup
    from instructedit.config import load_config
    from instructedit.editors.mend import MENDEditor
    from instructedit.evaluation.generation_check import generation_scores, scaled_step_sizes, selection_score
    from instructedit.models.loading import load_model, resolve_device
    from instructedit.tasks.collate import check_edit_forms
    from instructedit.tasks.loaders import load_records
    from instructedit.tasks.prepare import prepare_data

    preserve = check_preservation_arguments(args)
    scales = parse_scales(args.scales if args.scales is not None else PRESERVED_SCALES if preserve else SCALES)
    if not 0 <= args.locality_floor <= 1:
        raise ValueError(f"--locality-floor must be in [0, 1], got {args.locality_floor}")
    run, output = Path(args.run), Path(args.output)
    source = run / args.checkpoint
    if not (run / CONFIG).is_file() or not (source / EDITOR_CONFIG).is_file():
        raise FileNotFoundError(f"--run {run}: needs {CONFIG} and {args.checkpoint}/{EDITOR_CONFIG} (a training run folder)")
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {output} exists and is not empty; choose a new folder")
    config = load_config(run / CONFIG)
    if args.edit_forms is not None:
        forms = list(check_edit_forms(args.edit_forms, "--edit-forms"))
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, edit_forms=forms))
    if args.val_size is not None:
        if args.val_size < 1:
            raise ValueError(f"--val-size must be >= 1, got {args.val_size}")
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, val_size=args.val_size))
    device = resolve_device(args.device)
    model, tokenizer = load_model(config.model.name, dtype=config.model.dtype, device=device)
    data = prepare_data(config, tokenizer)
    editor = MENDEditor.from_pretrained(source, device=device).eval()
    if preserve:
        if args.preserve_data is not None:
            where = f"--preserve-data {args.preserve_data}"
            texts = preservation_texts(load_records(Path(args.preserve_data)).records, args.preserve, where)
        else:
            where = f"the training split of {run} ({', '.join(config.data.tasks)}, split seed {config.data.split_seed})"
            texts = preservation_texts(data.train, args.preserve, where)
        memory = key_memory(editor, model, data.collator, texts, past_weight=0.0, text_weight=args.preserve_weight[0])
        editor.set_preservation(memory, f"the locality prompts + answers of the first {args.preserve} records with one of {where} "
                                        f"({len(texts)} texts, {memory.text_tokens} tokens)")
        print(f"preservation sample: {editor.preservation_source}")
    instructions = data.instructions(data.val, config.data.instruction_seed)
    grid: dict[float | None, dict[float, dict[str, float]]] = {}  # preservation weight (None: none) -> multiplier -> scores
    for weight in args.preserve_weight if preserve else [None]:
        if weight is not None:
            memory.text_weight = weight  # the covariance is the sample's; the weight only scales it
            print(f"preservation weight {weight:g}:")
        grid[weight] = generation_scores(model, tokenizer, editor, data.collator, data.val, instructions, scales, progress=True)
    pairs = {(w, sc): v for w, per in grid.items() for sc, v in per.items()}
    # the selection rule of training validation; on a tie the smaller multiplier, then the larger preservation weight
    chosen_weight, chosen = max(pairs, key=lambda k: (selection_score(pairs[k], args.locality_floor), -k[1], k[0] or 0))
    per_scale = grid[chosen_weight]
    if chosen_weight is not None:
        memory.text_weight = chosen_weight
    saved = json.loads((source / EDITOR_CONFIG).read_text())
    extra = {k: v for k, v in saved.items() if k not in editor.editor_config()}
    extra["queries"] = {**(extra.get("queries") or query_setup(source)), "edit_forms": list(data.collator.edit_forms)}  # how its edits are made
    extra["calibration"] = {"source": str(source), "scales": {f"{s:g}": v for s, v in per_scale.items()}, "chosen": chosen,
                            "locality_floor": args.locality_floor, "edit_forms": list(data.collator.edit_forms), "records": f"the first {config.training.val_size} records of the run's validation split",
                            "preservation": None if editor.preservation is None else
                            {"weight": editor.preservation.text_weight, "source": editor.preservation_source,
                             "weights_tried": {f"{w:g}": {f"{sc:g}": v for sc, v in per.items()} for w, per in grid.items()}}}
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with scaled_step_sizes(editor, chosen):
        editor.save_pretrained(tmp, extra=extra)
    for name in ("README.md", "training_config.yaml"):
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    write_json(tmp / "calibration.json", extra["calibration"])
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(output, ignore_errors=True)
    tmp.rename(output)
    for (w, sc), v in pairs.items():
        mark = "  <- chosen" if (w, sc) == (chosen_weight, chosen) else ""
        weight = "" if w is None else f"preservation weight {w:g}, "
        forms = "".join(f", {k[len('gen_reliability_'):]} {x:.3f}" for k, x in v.items() if k.startswith("gen_reliability_"))
        print(f"{weight}α × {sc:g}: generation reliability {v.get('gen_reliability', 0):.3f}{forms}, generation locality "
              f"{v.get('gen_locality', 0):.3f} (n={v.get('gen_n', 0)}){mark}")
    print(f"wrote {output} (step sizes × {chosen:g}{'' if chosen_weight is None else f', preservation weight {chosen_weight:g}'})")
    return 0
