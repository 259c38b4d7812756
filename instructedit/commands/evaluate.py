"""``instructedit evaluate``: load model, editor and records, run the evaluation, write JSON + Markdown."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from instructedit.api import instruction_setup, query_setup, sequence_rounds, untrained_queries
from instructedit.commands.common import (
    add_dtype_argument, add_key_memory_arguments, add_neighbour_arguments, add_outlier_argument, check_key_memory_arguments,
    key_memory_by_default, key_memory_from_arguments, load_eval_records, neighbours_from_arguments, outlier_factor_from_arguments,
)
from instructedit.config import DEFAULT_MODEL, YAMLLoader
from instructedit.editors.card import editor_model_name
from instructedit.editors.learned import check_edit_rounds
from instructedit.editors.neighbours import NEIGHBOUR_ROUNDS, SAMPLE_ROUNDS
from instructedit.evaluation.generation_probes import QUERY_FORMS, check_forms
from instructedit.evaluation.judge import LLMJudge
from instructedit.evaluation.metrics import PROTOCOL_CHOICES
from instructedit.evaluation.report import EvalReport, interval_cell
from instructedit.io import json_stem
from instructedit.records import TASKS
from instructedit.runs import EDITOR_WEIGHTS, editor_sha256
from instructedit.tasks.collate import ANSWER_STOPS, check_edit_forms
from instructedit.tasks.instructions import InstructionPool

logger = logging.getLogger(__name__)

def add_evaluate_parser(subparsers: Any) -> None:
    """Register ``evaluate`` on an ``add_subparsers()`` object; its ``func(args) -> int`` runs it."""
    p = subparsers.add_parser(
        "evaluate", help="edit each test case and report reliability / generalization / locality / portability",
        description="Single edits, rolled back after each case (or kept, with --sequential); writes FILE.json and FILE.md.",
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--editor", metavar="DIR", help="a trained editor folder (MEND/InstructEdit or KE: the method its editor_config.json names)")
    which.add_argument("--method", metavar="NAME", help="an editing method from the editor registry (e.g. ft, grace)")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE", help="editor option (repeatable; values parsed as YAML)")
    p.add_argument("--task", required=True, help=f"task name, one of {', '.join(TASKS)}")
    p.add_argument("--data", metavar="FILE", help="evaluate this data file (format auto-detected) instead of the task's split")
    p.add_argument("--data-dir", default=None, help="data folder for the task splits (default: $INSTRUCTEDIT_DATA or ../shared/data)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split of the task (default: test)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N records only")
    p.add_argument("--instruction", default=None,
                   help="'seen', 'unseen', a description index, or 'none' (no instruction); default: 'seen' for an editor trained "
                        "with instructions (and for registry methods), 'none' for one trained without")
    p.add_argument("--instruction-pool", metavar="FILE", default=None, help="instruction pool JSON (default: the project's descriptions)")
    p.add_argument("--model", default=None, help=f"model (default: the editor's model_name, else {DEFAULT_MODEL})")
    p.add_argument("--sequential", action="store_true", help="keep every edit and report how earlier edits decay")
    add_key_memory_arguments(p, "--sequential: each edit's solve", with_neighbours=True)
    add_outlier_argument(p)
    p.add_argument("--protocol", default="both", choices=PROTOCOL_CHOICES,
                   help="teacher_forced (the paper's token accuracies), generation (greedy answers, exact match) or both (default)")
    p.add_argument("--answer-stop", default=None, choices=ANSWER_STOPS,
                   help="what the edit input's answer ends with (default: the editor's answer_stop from its editor_config.json, else none)")
    p.add_argument("--edit-forms", default=None, metavar="FORMS",
                   help="comma-separated forms each edit is made in, solved together: wrapped (the instruction-wrapped prompt), plain "
                        "(the bare question), chat (the question as a chat user turn) (default: the editor's edit_forms from its "
                        "editor_config.json, else wrapped; --sequential: its many_edit_forms, which leave the bare question out)")
    p.add_argument("--edit-rounds", type=int, default=None, metavar="K",
                   help="the rounds each edit is made in, each on the model the earlier ones edited (a learned editor; default: the "
                        "editor's edit_rounds from its editor_config.json, chosen by calibrate --rounds, else 1; --sequential: 1; --neighbours: twice that; "
                        f"--sequential --neighbours with a key memory holding a preservation sample, the default: {SAMPLE_ROUNDS})")
    p.add_argument("--queries", default=",".join(QUERY_FORMS), metavar="FORMS",
                   help=f"comma-separated forms of the edit prompt the generation protocol asks (default: {','.join(QUERY_FORMS)})")
    p.add_argument("--no-in-frame", action="store_true",
                   help="the generation protocol does not ask each case the next record's question in the case's forms and frame "
                        "(in-frame locality: gen_locality_in_frame, gen_in_frame_target)")
    p.add_argument("--same-relation", type=int, default=0, metavar="K",
                   help="the generation protocol also asks each case K questions of its relation about other entities (its prompt "
                        "with its subject swapped) in its forms and frame: gen_locality_same_relation, gen_same_relation_target "
                        "(default 0: none; the questions an edit leaks into most, results/analysis/in-frame-locality/relation/)")
    p.add_argument("--same-relation-subjects", metavar="FILE", default=None,
                   help="--same-relation: the entities swapped in (a text file, one a line, or an edit data file's subjects; "
                        "default: the subjects of the task's split or --data file, all of them whatever --limit)")
    add_neighbour_arguments(p, "the case's")
    p.add_argument("--generation-batch-size", type=int, default=32, metavar="N", help="most queries per greedy generation batch")
    p.add_argument("--judge", action="store_true",
                   help="also ask an LLM judge whether the answer states the target (OpenAI-compatible endpoint from "
                        "OPENAI_BASE_URL / OPENAI_API_KEY / OPENAI_MODEL); adds gen_reliability_judge")
    p.add_argument("--judge-model", default=None, help="the judge's model name (default: $OPENAI_MODEL, else the proposers' default)")
    p.add_argument("--judge-timeout", type=float, default=30.0, metavar="S", help="seconds to wait for one judge answer")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="most probe rows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="split seed (and torch seed)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    add_dtype_argument(p)
    p.add_argument("--output", required=True, metavar="FILE.json",
                   help="report path (FILE.json.gz: gzipped, ~13x smaller for hundreds of cases); the Markdown table goes beside it as FILE.md")
    p.add_argument("--restart", action="store_true",
                   help="score every case again, ignoring the cases an interrupted run of the same evaluation kept in FILE.partial.jsonl "
                        "(by default the run resumes from them; --sequential makes their edits again, unscored, then goes on)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_evaluate)


def parse_options(items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> {k: YAML-parsed v}."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--method-option {item!r} must look like KEY=VALUE")
        options[key.strip()] = yaml.load(raw, Loader=YAMLLoader) if raw.strip() else ""  # as --set: 1e-5 is a float
    return options


HEADLINE_ROWS = (  # (row label, teacher-forced metric, generation metric)
    ("reliability", "reliability", "gen_reliability"),
    ("reliability, plain prompt", None, "gen_reliability_plain"),
    ("reliability, chat question", None, "gen_reliability_chat"),
    ("reliability, judge", None, "gen_reliability_judge"),
    ("generalization", "generalization", "gen_generalization"),
    ("locality", "locality", "gen_locality"),
    ("locality in the edit's frame", None, "gen_locality_in_frame"),
    ("  saying the edit's target", None, "gen_in_frame_target"),
    ("  ... asked bare", None, "gen_locality_in_frame_plain"),
    ("  ... asked as a chat turn", None, "gen_locality_in_frame_chat"),
    ("same-relation questions in frame", None, "gen_locality_same_relation"),
    ("  saying the edit's target", None, "gen_same_relation_target"),
    ("portability", "portability", "gen_portability"),
)


def headline(report: EvalReport, task: str) -> list[str]:
    """Post-edit reliability / generalization / locality / portability, one row each, the two protocols side by side:
    mean [95 % bootstrap interval] and n (rows and columns with no value are left out)."""
    phases = report.aggregates.get(task, {})
    tf, gen = phases.get("post", {}), phases.get("gen_post", {})
    columns = [(name, values, i) for i, (name, values) in enumerate((("teacher-forced", tf), ("generation (said)", gen))) if values]
    rows = []
    for label, *keys in HEADLINE_ROWS:
        cells = [values.get(keys[i]) if keys[i] else None for _, values, i in columns]
        if any(c is not None for c in cells):
            rows.append((label, [f"{interval_cell(c)} n={c.n}" if c is not None else "" for c in cells]))
    if not rows:
        return []
    width = max(len(label) for label, _ in rows) + 2
    cell = max([len(name) for name, *_ in columns] + [len(t) for _, texts in rows for t in texts]) + 3
    lines = [" " * (width + 2) + "".join(f"{name:<{cell}}" for name, *_ in columns).rstrip()]
    return lines + [f"  {label:<{width}}" + "".join(f"{t:<{cell}}" for t in texts).rstrip() for label, texts in rows]


def resolve_instruction(value: str, pool: InstructionPool) -> int | None:
    """'none' -> None; 'seen' / 'unseen' / an index -> a checked description index."""
    if value.lower() == "none":
        return None
    if value not in ("seen", "unseen") and not value.isdigit():
        raise ValueError(f"--instruction {value!r} is not 'seen', 'unseen', a description index or 'none'")
    return pool.evaluation_index(value)


def make_judge(args: argparse.Namespace) -> LLMJudge:
    """The LLM judge of ``--judge``: an OpenAI-compatible endpoint from the environment, asked deterministically."""
    from instructedit.analysis.proposers import OpenAIProposer

    return LLMJudge(OpenAIProposer(model=args.judge_model, temperature=0.0, max_tokens=4, timeout=args.judge_timeout, seed=0))


def _neighbour_arguments(args: argparse.Namespace, method: str) -> tuple[Any, tuple[str, ...] | None]:
    """``--neighbours`` (with the editor's saved pool unless ``--subjects``) and ``--same-relation``'s subjects, checked
    before anything loads."""
    from instructedit.editors.neighbours import load_subjects, read_subjects

    if args.same_relation < 0:
        raise ValueError(f"--same-relation must be >= 0 questions per case, got {args.same_relation}")
    if args.same_relation_subjects is not None and not args.same_relation:
        raise ValueError("--same-relation-subjects goes with --same-relation K")
    if args.same_relation and args.protocol == "teacher_forced":
        raise ValueError("--same-relation asks questions of the generation protocol: not with --protocol teacher_forced")
    probes = read_subjects(args.same_relation_subjects) if args.same_relation_subjects else None
    neighbours = neighbours_from_arguments(args)
    if neighbours is not None and neighbours.subjects is None:
        pool = load_subjects(args.editor) if args.editor else None
        if pool is None:
            raise ValueError(f"--neighbours: {args.editor or method} has no subject pool saved with it; give --subjects FILE")
        neighbours = dataclasses.replace(neighbours, subjects=pool)
    return neighbours, probes


def run_evaluate(args: argparse.Namespace) -> int:
    from instructedit.editors.registry import EDITORS, make_editor, saved_method
    from instructedit.evaluation.cache import evaluate_resuming
    from instructedit.evaluation.report import EvalSettings, write_markdown
    from instructedit.models.loading import load_model, resolve_device

    # Everything that can be checked without loading a model fails first.
    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; valid tasks: {', '.join(TASKS)}")
    method = saved_method(args.editor) if args.editor else args.method
    if method not in EDITORS:
        raise ValueError(f"unknown editing method {method!r}; valid methods: {sorted(EDITORS)}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    forms = check_forms([f.strip() for f in args.queries.split(",") if f.strip()])
    key_memory_by_default(args, args.sequential)
    check_key_memory_arguments(args, needs="--key-memory --sequential", sequential=args.sequential)
    outlier_factor = outlier_factor_from_arguments(args)
    neighbours, probe_subjects = _neighbour_arguments(args, method)
    output = Path(args.output)
    try:
        markdown_path = Path(f"{json_stem(output)}.md")  # not with_suffix: a name like x-1.5 keeps its ".5"
    except ValueError as error:
        raise ValueError(f"--output {error} (.json.gz: a gzipped report; the Markdown goes beside it as FILE.md)") from None
    options = parse_options(args.method_option)
    editor_path = args.editor or options.get("path")
    if args.editor:
        options["path"] = args.editor
    model_name = args.model or (editor_model_name(editor_path) if args.editor else None) or DEFAULT_MODEL
    # how the editor was trained to be asked (its editor_config.json, read once); a registry method: no template or stop
    trained = query_setup(editor_path) if editor_path else untrained_queries()
    answer_stop = args.answer_stop or trained["answer_stop"]
    # unsaid, decided once the key memory is made (a sequence's rounds depend on whether it holds a sample of its own)
    edit_rounds = check_edit_rounds(args.edit_rounds, "--edit-rounds") if args.edit_rounds is not None else None
    edit_forms = check_edit_forms(args.edit_forms or (trained["many_edit_forms"] if args.sequential else trained["edit_forms"]), "--edit-forms")
    judge = make_judge(args) if args.judge else None
    pool = InstructionPool.from_file(args.instruction_pool) if args.instruction_pool else InstructionPool.default()
    which, why = args.instruction, "given with --instruction"
    if args.editor:
        trained_with, _ = instruction_setup(args.editor)
        if which is None:
            which, why = ("none", "the editor was trained without instructions") if trained_with is False else \
                ("seen", "the editor was trained with instructions" if trained_with else "no training config found: assumed with instructions")
        if trained["template"] and not args.instruction_pool:
            pool = dataclasses.replace(pool, template=trained["template"])  # asked in the template it was trained with
    elif which is None:
        which, why = "seen", "the default for registry methods"
    instruction = resolve_instruction(which, pool)
    logger.info("instruction: %s (%s)", which, why)
    records, where, load_skipped = load_eval_records(args.task, args.data, args.data_dir, args.split, args.seed)
    if args.same_relation and probe_subjects is None:  # the file's entities, --limit or not
        probe_subjects = tuple(r.subject for r in records)
    records = records[: args.limit] if args.limit is not None else records
    if not records:
        raise ValueError(f"no records to evaluate for task {args.task!r} ({args.data or args.split})")

    torch.manual_seed(args.seed)
    device = resolve_device(args.device)
    model, tokenizer = load_model(model_name, dtype=args.dtype, device=device)
    editor = make_editor(method, model, tokenizer, options)
    memory = None
    if args.key_memory:  # the sample leaves out the locality prompts this run scores
        measured = {(q.prompt, q.answer) for r in records for q in r.locality}
        memory = key_memory_from_arguments(args, editor, model, tokenizer, measured)[0]
    if edit_rounds is None:  # as apply_sequential(rounds="auto") decides, or twice the calibrated rounds with neighbours
        edit_rounds = sequence_rounds(neighbours is not None, memory) if args.sequential else \
            trained["edit_rounds"] * (NEIGHBOUR_ROUNDS if neighbours is not None else 1)
    weights = Path(editor_path) / EDITOR_WEIGHTS if editor_path else None
    settings = EvalSettings(
        instruction_reason=why,
        task=args.task, method=method, method_options={k: v for k, v in options.items() if k != "path"},
        editor_path=str(editor_path) if editor_path else None,
        editor_sha256=editor_sha256(editor_path) if weights is not None and weights.is_file() else None,
        model_name=model_name, limit=args.limit, **where,
    )
    # written to --output as it ends (the loader's skips beside the runner's); meanwhile every finished case is kept in
    # FILE.partial.jsonl, from which a rerun resumes
    report = evaluate_resuming(output, model, tokenizer, editor, records, pool, instruction, settings, restart=args.restart,
                               load_skipped=load_skipped, batch_size=args.batch_size, sequential=args.sequential,
                               progress=not args.no_progress, protocol=args.protocol, answer_stop=answer_stop, edit_forms=edit_forms,
                               queries=forms, in_frame=not args.no_in_frame, generation_batch_size=args.generation_batch_size,
                               judge=judge, memory=memory, edit_rounds=edit_rounds, outlier_factor=outlier_factor,
                               **({"neighbours": neighbours} if neighbours is not None else {}),
                               **({"same_relation": args.same_relation, "same_relation_subjects": probe_subjects} if args.same_relation else {}),
                               step_scale=trained["many_edit_scale"] if args.sequential else 1.0)  # kept one after another: as apply_sequential
    markdown = write_markdown([report], markdown_path)
    resumed = int(report.timing.get("resumed_cases", 0))
    speed = f"{report.timing['cases_per_s']:.2f} cases/s" + (f" over the {len(report.cases) - resumed} scored now, {resumed} resumed "
                                                             "from an interrupted run" if resumed else "")
    print(f"{report.settings.label} on {args.task}: {len(report.cases)} cases, {speed}; "
          "after each edit, % (mean [95 % bootstrap interval], n cases):")
    print("\n".join(headline(report, args.task)))
    if report.sequential:  # what is left of every edit after the last one (the Markdown has the whole curve)
        last = report.sequential[-1]
        locality = f", locality {100 * last.locality:.1f} %" if last.locality is not None else ""
        said = f"; said {100 * last.gen_reliability:.1f} % (generation)" if last.gen_reliability is not None else ""
        kept = f", greedy answers kept {100 * last.gen_locality:.1f} %" if last.gen_locality is not None else ""
        print(f"after all {last.edits} sequential edits: reliability of every edited case {100 * last.reliability:.1f} % "
              f"(teacher-forced, n={last.reliability_n}){locality}{said}{kept}")
    refused = [c.source for c in report.cases if c.refused]
    if refused:
        print(f"{len(refused)} of {len(report.cases)} sequential edits not kept (each would have moved a weight more than "
              f"{report.settings.outlier_factor:g}× the median change of the edits before it): {', '.join(refused[:10])}"
              f"{', ...' if len(refused) > 10 else ''}")
    print(f"wrote {output} and {markdown}")
    return 0
