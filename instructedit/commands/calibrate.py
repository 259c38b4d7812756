"""``instructedit calibrate``: choose a trained editor's step-size multiplier for generation on its run's validation split.

The meta-objective is teacher-forced; the step sizes α it learns can leave an edit too weak to win
the first answer token when the edited model decodes by itself, or (multiplied too far) strong
enough to leak into unrelated answers. This tries a few multipliers of α on the run's validation
records (never the test split), keeps the one with the highest generation reliability whose
generation locality is at or above the floor, and writes the editor with α × that multiplier.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path
from typing import Any

from instructedit.io import write_json
from instructedit.runs import CONFIG, EDITOR_CONFIG

logger = logging.getLogger(__name__)


def add_calibrate_parser(subparsers: Any) -> None:
    """Register ``calibrate`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("calibrate", help="choose an editor's step-size multiplier for generation on its validation split",
                              description="Tries multipliers of the learned step sizes on the run's validation records and writes "
                                          "the editor with the best one (highest generation reliability at or above the locality floor).")
    p.add_argument("--run", required=True, metavar="DIR", help="a training run folder (config.yaml, best/ or last/)")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"), help="which editor of the run (default: best)")
    p.add_argument("--scales", default="1,1.5,2,3", help="comma-separated multipliers to try (default 1,1.5,2,3)")
    p.add_argument("--locality-floor", type=float, default=0.9, help="lowest generation locality accepted (default 0.9)")
    p.add_argument("--output", required=True, metavar="DIR", help="where to write the calibrated editor (a new folder)")
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


def run_calibrate(args: argparse.Namespace) -> int:
    import json

    from instructedit.config import load_config
    from instructedit.editors.mend import MENDEditor
    from instructedit.evaluation.generation_check import choose_scale, generation_scores, scaled_step_sizes
    from instructedit.models.loading import load_model, resolve_device
    from instructedit.tasks.prepare import prepare_data

    scales = parse_scales(args.scales)
    if not 0 <= args.locality_floor <= 1:
        raise ValueError(f"--locality-floor must be in [0, 1], got {args.locality_floor}")
    run, output = Path(args.run), Path(args.output)
    source = run / args.checkpoint
    if not (run / CONFIG).is_file() or not (source / EDITOR_CONFIG).is_file():
        raise FileNotFoundError(f"--run {run}: needs {CONFIG} and {args.checkpoint}/{EDITOR_CONFIG} (a training run folder)")
    if output.exists() and any(output.iterdir()):
        raise ValueError(f"--output {output} exists and is not empty; choose a new folder")
    config = load_config(run / CONFIG)
    device = resolve_device(args.device)
    model, tokenizer = load_model(config.model.name, dtype=config.model.dtype, device=device)
    data = prepare_data(config, tokenizer)
    editor = MENDEditor.from_pretrained(source, device=device).eval()
    instructions = data.instructions(data.val, config.data.instruction_seed)
    per_scale = generation_scores(model, tokenizer, editor, data.collator, data.val, instructions, scales)
    chosen = choose_scale(per_scale, args.locality_floor)
    saved = json.loads((source / EDITOR_CONFIG).read_text())
    extra = {k: v for k, v in saved.items() if k not in editor.editor_config()}
    extra["calibration"] = {"source": str(source), "scales": {f"{s:g}": v for s, v in per_scale.items()}, "chosen": chosen,
                            "locality_floor": args.locality_floor, "records": "validation split of the run"}
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
    for s, v in per_scale.items():
        mark = "  <- chosen" if s == chosen else ""
        print(f"α × {s:g}: generation reliability {v.get('gen_reliability', 0):.3f}, generation locality {v.get('gen_locality', 0):.3f} "
              f"(n={v.get('gen_n', 0)}){mark}")
    print(f"wrote {output} (step sizes × {chosen:g})")
    return 0
