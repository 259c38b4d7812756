"""``instructedit analyze``: studies of trained editors (gradients, seen vs unseen instructions; scaling and balance train theirs;
batch and sequential: many edits, in ``analyze_edits``)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from instructedit.commands.analyze_edits import add_edit_studies
from instructedit.commands.common import load_editor_model, per_editor
from instructedit.records import TASKS

logger = logging.getLogger(__name__)


def parse_tasks(value: str) -> tuple[str, ...]:
    """``a,b`` -> the task names, each checked (an argparse ``type``)."""
    tasks = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or value!r}; valid tasks: {', '.join(TASKS)}")
    return tasks


def add_analyze_parser(subparsers: Any) -> None:
    """Register ``analyze`` (its studies) on an ``add_subparsers()`` object; each leaf's ``func(args) -> int`` runs it."""
    analyze = subparsers.add_parser("analyze", help="studies of trained editors: gradients, task scaling, balance, instructions, many edits")
    studies = analyze.add_subparsers(dest="analyze_command", metavar="STUDY")
    studies.required = True

    g = studies.add_parser("gradients", help="2-D map of per-edit MEND updates coloured by task, with a separation score",
                           description="For each edit: MEND's update of one weight, sketched, PCA-reduced, embedded in 2-D. "
                                       "Writes gradients.json (silhouette, between/within distance ratio per editor) and PNGs.")
    g.add_argument("--editor", action="append", required=True, metavar="DIR", help="a saved editor (RUN/best); repeat to compare editors")
    g.add_argument("--label", action="append", default=[], metavar="NAME", help="name of each --editor in figures (default: the run folder's name)")
    g.add_argument("--instructions", action="append", default=[], choices=("auto", "on", "off"),
                   help="per --editor: wrap edit inputs in the task instruction or not (default auto: the run's data.instructions)")
    g.add_argument("--tasks", type=parse_tasks, default=("counterfact", "wikirecent", "convsent", "zsre"), help="comma-separated tasks (default: all four)")
    g.add_argument("--n", type=int, default=200, help="edits per task: the first N of its split (default 200)")
    g.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to draw edits from (default: test; ZsRE's is the held-out file)")
    g.add_argument("--weight", default=None, metavar="NAME", help="editable weight (full name or unique suffix; default: the last inner weight)")
    g.add_argument("--projection-dim", type=int, default=2048, help="size of the seeded Gaussian sketch of each update (default 2048)")
    g.add_argument("--pca-components", type=int, default=50, help="PCA dimensions for the scores and the embedding (default 50)")
    g.add_argument("--embedding", default="tsne", choices=("tsne", "pca"), help="2-D embedding of the PCA space (default tsne)")
    g.add_argument("--no-normalize", action="store_true", help="keep update magnitudes (default: unit-length directions)")
    g.add_argument("--instruction", default="seen", help="description for instruction editors: seen (default), unseen or an index")
    g.add_argument("--instruction-pool", default=None, metavar="FILE", help="instruction pool JSON (default: the project's descriptions)")
    add_study_arguments(g)
    g.set_defaults(func=run_gradients)

    s = studies.add_parser("scaling", help="train editors on 1, 2, 3 tasks and test each on held-out ZsRE (resumable)")
    s.add_argument("--config", required=True, metavar="YAML", help="study config (see configs/analysis/scaling-smollm2.yaml)")
    s.add_argument("--output", required=True, metavar="DIR", help="study folder: <n>-tasks/ runs, scaling.json, scaling.png")
    s.add_argument("--device", default=None, help="override training.device of the base config")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=run_training_study)

    b = studies.add_parser("balance", help="ConvSent balanced / unbalanced / oversampled in the mixture: reliability and gradient separation")
    b.add_argument("--config", required=True, metavar="YAML", help="study config (see configs/analysis/balance-smollm2.yaml)")
    b.add_argument("--output", required=True, metavar="DIR", help="study folder: one run per variant, balance.json, PNGs")
    b.add_argument("--convsent-factor", type=float, default=None, metavar="F",
                   help="add a variant with ConvSent uncapped and its training records repeated F times")
    b.add_argument("--device", default=None, help="override training.device of the base config")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=run_training_study)

    i = studies.add_parser("instructions", help="evaluate one editor with each description of a task: seen vs unseen")
    i.add_argument("--editor", required=True, metavar="DIR", help="a saved InstructEdit editor (RUN/best)")
    i.add_argument("--task", required=True, choices=TASKS)
    i.add_argument("--limit", type=int, default=None, metavar="N", help="first N records of the split")
    i.add_argument("--split", default="test", choices=("train", "val", "test"))
    i.add_argument("--instruction-pool", default=None, metavar="FILE", help="instruction pool JSON (default: the project's descriptions)")
    i.add_argument("--batch-size", type=int, default=16)
    add_study_arguments(i)
    i.set_defaults(func=run_instruction_study)

    add_edit_studies(studies)


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    """The model, data, seeds, device and output folder of a study of saved editors."""
    p.add_argument("--model", default=None, help="model (default: the editor's model_name)")
    p.add_argument("--data-dir", default=None, help="data folder (default: $INSTRUCTEDIT_DATA or ../shared/data)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test splits: the one the editor was trained with (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the projection, t-SNE and the proposer's sampling (default 0)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_gradients(args: argparse.Namespace) -> int:
    from instructedit.analysis.gradients import GradientSettings, editor_spec, gradient_study
    from instructedit.models.loading import resolve_device

    labels = per_editor(args.label, args.editor, "--label", None)
    modes = per_editor(args.instructions, args.editor, "--instructions", "auto")
    specs = [editor_spec(path, label, mode, args.model) for path, label, mode in zip(args.editor, labels, modes)]
    settings = GradientSettings(
        tasks=args.tasks, n=args.n, split=args.split, weight=args.weight, projection_dim=args.projection_dim,
        normalize=not args.no_normalize, pca_components=args.pca_components, embedding=args.embedding,
        instruction=args.instruction, instruction_pool=args.instruction_pool, data_dir=args.data_dir, split_seed=args.split_seed, seed=args.seed,
    )
    result = gradient_study(specs, settings, args.output, device=resolve_device(args.device), progress=not args.no_progress)
    for label, s in result["summary"].items():
        sil = "–" if s["silhouette"] is None else f"{s['silhouette']:.3f}"
        ratio = "–" if s["between_within_ratio"] is None else f"{s['between_within_ratio']:.2f}"
        print(f"{label}: silhouette {sil}, between/within distance {ratio}")
    print(f"wrote {Path(args.output) / 'gradients.json'} and {', '.join(result['figures'])}")
    return 0


def run_training_study(args: argparse.Namespace) -> int:
    """``analyze scaling`` / ``analyze balance``: load the study config, train and evaluate its editors (resumable), print a line each."""
    from instructedit.experiments import balance, scaling

    studies = {  # study -> (load its config, run it, the result's rows, one printed line per row)
        "scaling": (scaling.load_scaling_config, scaling.run_scaling, "points", _scaling_line),
        "balance": (balance.load_balance_config, balance.run_balance, "variants", _balance_line),
    }
    load, run, rows, line = studies[args.analyze_command]
    cfg, base = load(args.config)
    if getattr(args, "convsent_factor", None) is not None:
        if args.convsent_factor <= 0:
            raise ValueError(f"--convsent-factor must be > 0, got {args.convsent_factor}")
        cfg = cfg.with_factor(args.convsent_factor)
    result = run(cfg, base, args.output, device=args.device, progress=not args.no_progress)
    for row in result[rows]:
        print(line(row, result))
    figures = result.get("figures") or [result["figure"]]
    print(f"wrote {Path(args.output) / f'{args.analyze_command}.json'} and {', '.join(figures)}")
    return 0


def _scaling_line(p: dict[str, Any], result: dict[str, Any]) -> str:
    post = p["post"]
    gen = "–" if post["generalization"] is None else f"{100 * post['generalization']:.1f}"
    tasks = "+".join(p["tasks"])
    return f"{p['n_tasks']} task(s) {tasks}: {result['eval_task']} reliability {100 * post['reliability']:.1f}, generalization {gen}"


def _balance_line(v: dict[str, Any], result: dict[str, Any]) -> str:
    rel = ", ".join(f"{t} {100 * r:.1f}" for t, r in v["reliability"].items() if r is not None)
    sil = "–" if v["silhouette"] is None else f"{v['silhouette']:.3f}"
    return f"{v['name']} (train {v['train_counts']}): reliability {rel}; silhouette {sil}"


def run_instruction_study(args: argparse.Namespace) -> int:
    from instructedit.analysis.gradients import recorded_instructions
    from instructedit.analysis.instructions_study import description_study
    from instructedit.evaluation.report import EvalSettings
    from instructedit.models.loading import resolve_device
    from instructedit.tasks.instructions import InstructionPool
    from instructedit.tasks.splits import eval_records

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    recorded, _ = recorded_instructions(args.editor)
    if recorded is False:
        logger.warning("%s was trained without instructions; comparing descriptions says little about it", args.editor)
    pool = InstructionPool.from_file(args.instruction_pool) if args.instruction_pool else InstructionPool.default()
    records = eval_records(args.task, args.split, args.limit, args.data_dir, args.split_seed)
    model, tokenizer, name = load_editor_model(args.editor, args.model, resolve_device(args.device))
    settings = EvalSettings(task=args.task, model_name=name, limit=args.limit, split=args.split, split_seed=args.split_seed, batch_size=args.batch_size)
    result = description_study(model, tokenizer, args.editor, records, pool, args.task, args.output, settings, args.batch_size, not args.no_progress)
    for row in result["descriptions"]:
        values = ", ".join(f"{k} {100 * v:.1f}" for k, v in row["metrics"].items() if v is not None and k in ("reliability", "generalization"))
        print(f"description {row['index']} ({row['status']}): {values}")
    rel = result["summary"].get("reliability")
    if rel:
        seen = rel["seen"]
        print(f"seen reliability {100 * seen['mean']:.1f} ± {100 * seen['std']:.1f} (range {100 * seen['min']:.1f}-{100 * seen['max']:.1f}); "
              + "; ".join(f"unseen {u['index']}: {100 * u['value']:.1f} ({100 * u['minus_seen_mean']:+.1f})" for u in rel["unseen"]))
    print(f"wrote {Path(args.output) / result['figure']} and its JSON")
    return 0
