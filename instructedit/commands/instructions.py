"""``instructedit instructions optimize``: construct task descriptions with a proposer LLM, scored by a trial editor."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from instructedit.commands.analyze import add_study_arguments
from instructedit.commands.common import load_editor_model
from instructedit.records import TASKS

logger = logging.getLogger(__name__)


def add_instructions_parser(subparsers: Any) -> None:
    """Register ``instructions`` (and its ``optimize``) on an ``add_subparsers()`` object."""
    instructions = subparsers.add_parser("instructions", help="instruction pools: construct descriptions with a proposer LLM")
    isub = instructions.add_subparsers(dest="instructions_command", metavar="SUBCOMMAND")
    isub.required = True
    o = isub.add_parser("optimize", help="propose / score / improve task descriptions until no improvement (DESIGN §6)",
                        description="A proposer LLM writes candidate descriptions, the trial editor scores each on the task's "
                                    "validation split, the proposer sees the scores and improves. Writes descriptions.json "
                                    "(a pool file), rounds.jsonl, optimize.json and optimize.png.")
    o.add_argument("--task", required=True, choices=TASKS)
    o.add_argument("--editor", required=True, metavar="DIR", help="the trial editor (an InstructEdit RUN/best)")
    o.add_argument("--proposer", required=True, choices=("openai", "local"))
    o.add_argument("--proposer-model", default=None, metavar="NAME",
                   help="openai: model name (default $OPENAI_MODEL or gpt-4o-mini); local: model (default the bundled SmolLM2-135M-Instruct)")
    o.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (default $OPENAI_BASE_URL, else https://api.openai.com/v1)")
    o.add_argument("--api-key", default=None, help="API key (default $OPENAI_API_KEY)")
    o.add_argument("--timeout", type=float, default=60.0, help="seconds per proposer request (default 60)")
    o.add_argument("--temperature", type=float, default=0.9)
    o.add_argument("--rounds", type=int, default=10, help="most proposal rounds (default 10)")
    o.add_argument("--patience", type=int, default=2, help="stop after K rounds without a better candidate (default 2)")
    o.add_argument("--candidates", type=int, default=5, help="candidates per round (default 5)")
    o.add_argument("--limit", type=int, default=50, metavar="N", help="validation records each candidate is scored on (default 50)")
    o.add_argument("--split", default="val", choices=("train", "val", "test"), help="split to score on (default val)")
    o.add_argument("--metric", default="reliability", choices=("reliability", "generalization", "locality", "portability"))
    o.add_argument("--tie-break", default="locality", choices=("reliability", "generalization", "locality", "portability", "none"))
    o.add_argument("--keep", type=int, default=10, help="best descriptions written for the task (default 10)")
    o.add_argument("--mode", default="replace", choices=("replace", "extend"), help="replace the task's descriptions or append new ones")
    o.add_argument("--no-baseline", action="store_true", help="do not score the base pool's descriptions first (round 0)")
    o.add_argument("--instruction-pool", default=None, metavar="FILE", help="base pool JSON (default: the project's descriptions)")
    o.add_argument("--batch-size", type=int, default=16)
    add_study_arguments(o)
    o.set_defaults(func=run_optimize)


def run_optimize(args: argparse.Namespace) -> int:
    from instructedit.analysis.optimize import EditorScorer, OptimizeSettings, optimize_instructions
    from instructedit.analysis.proposers import ProposerError, make_proposer
    from instructedit.editors.mend import MENDEditor
    from instructedit.models.loading import resolve_device
    from instructedit.tasks.instructions import InstructionPool
    from instructedit.tasks.splits import eval_records

    settings = OptimizeSettings(
        task=args.task, rounds=args.rounds, patience=args.patience, candidates=args.candidates, metric=args.metric,
        tie_break=None if args.tie_break == "none" else args.tie_break, keep=args.keep, mode=args.mode, baseline=not args.no_baseline,
    )
    if args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    records = eval_records(args.task, args.split, args.limit, args.data_dir, args.split_seed)
    pool = InstructionPool.from_file(args.instruction_pool) if args.instruction_pool else InstructionPool.default()
    device = resolve_device(args.device)
    if args.proposer == "openai":  # fail on a missing key before loading any model
        proposer = make_proposer("openai", model=args.proposer_model, base_url=args.base_url, api_key=args.api_key,
                                 temperature=args.temperature, timeout=args.timeout, seed=args.seed)
    model, tokenizer, name = load_editor_model(args.editor, args.model, device)
    if args.proposer == "local":
        proposer_name = args.proposer_model or name
        same = proposer_name == name
        proposer = make_proposer("local", model=model if same else None, tokenizer=tokenizer if same else None,
                                 model_name=proposer_name, device=device, temperature=args.temperature, seed=args.seed)
    editor = MENDEditor.from_pretrained(args.editor, device=next(model.parameters()).device).eval()
    scorer = EditorScorer(model, tokenizer, editor, records, args.task, pool.template, batch_size=args.batch_size)
    extra = {"editor": args.editor, "model_name": name, "split": args.split, "limit": args.limit, "split_seed": args.split_seed}
    try:
        result = optimize_instructions(proposer, scorer, settings, args.output, args.instruction_pool, extra)
    except ProposerError as err:
        logger.error("%s", err)
        return 2
    best = result["best"]
    print(f"{result['rounds_run']} round(s), stopped by {result['stop_reason']}; best: {best['text']!r} "
          + ", ".join(f"{k} {100 * v:.1f}" for k, v in best["metrics"].items() if v is not None))
    print(f"wrote {Path(args.output) / result['pool_file']}, {result['log_file']}, optimize.json, {result['figure']}")
    return 0
