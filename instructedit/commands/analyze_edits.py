"""``instructedit analyze batch|sequential``: many edits in one call and one after another (``analysis/many_edits.py``), JSON + PNG."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructedit.commands.common import (
    EDITOR_TEXTS, NO_TEXTS, add_key_memory_arguments, add_rounds_arguments, aggregation, check_key_memory_arguments, load_eval_records, per_editor,
)
from instructedit.config import LS_KEYS, check_edit_forms
from instructedit.records import TASKS, EditRecord

logger = logging.getLogger(__name__)

MIN_PERPLEXITY_TEXTS = 100  # fewer held-out texts make the perplexity ratio too noisy to read a trend from
PROTOCOLS = ("both", "teacher_forced")
BATCH_PANELS = (("reliability", "%"), ("generalization", "%"), ("locality", "%"), ("seconds_per_edit", "seconds per edit (one call)"))
SEQUENTIAL_PANELS = (("reliability", "% (all edits so far)"), ("locality", "%"), ("perplexity_ratio", "held-out perplexity / unedited"))


def parse_sizes(value: str) -> tuple[int, ...]:
    """``1,8,64`` -> (1, 8, 64), each a whole number >= 1 (an argparse ``type``)."""
    parts = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in parts if not p.isdigit() or int(p) < 1]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"size {bad[0] if bad else value!r} is not a whole number >= 1; give e.g. --sizes 1,8,64,256")
    return tuple(sorted({int(p) for p in parts}))


def add_edit_studies(studies: Any) -> None:
    """Register ``analyze batch`` and ``analyze sequential`` on the ``analyze`` subparsers."""
    b = studies.add_parser("batch", help="N edits in one call (the editor's aggregation): quality and seconds per edit against N",
                           description="For each N in --sizes, the first N records are edited in ONE call, then scored (teacher-forced "
                                       "and, with --protocol both, greedy answers); the weights are restored bit for bit after each N. "
                                       "Writes FILE.json and FILE.png.")
    _study_arguments(b, "batch")
    b.add_argument("--sizes", type=parse_sizes, default=(1, 8, 64, 256, 512), metavar="N,N,...",
                   help="comma-separated numbers of edits per call (default 1,8,64,256,512)")
    b.add_argument("--singles", action="store_true",
                   help="also edit each of the first max(--sizes) records alone and score it the same way (JSON 'single'): the "
                        "single-edit reliability the N-edit calls are compared with (with --key-memory, single edits that hold its "
                        "sample still too: a heavy sample weakens them, so compare with a run without it)")
    b.add_argument("--ls-keys", choices=LS_KEYS, default=None,
                   help="least_squares editors: the tokens whose keys the solve fits, 'all' (every token with a gradient) or "
                        "'answer' (the answer positions only: many edits stop competing over their prompts' shared keys); "
                        "default: the editor's own editor.ls_keys")
    b.add_argument("--distinct-subjects", action="store_true",
                   help="edit only the first record of each subject (records that share a subject can ask one call for "
                        "contradictory answers to one question, e.g. two architects of one building): the first N such records")
    b.add_argument("--start", type=int, default=0, metavar="K",
                   help="begin at record K of the split or --data (default 0): the calls edit records K..K+N-1 and "
                        "--unedited-locality scores the records after them; the records before K are neither edited nor scored "
                        "(another block of the same split: several blocks measure one configuration on more cases)")
    b.add_argument("--unedited-locality", type=int, default=0, metavar="K",
                   help="also score every N-edit call's locality (both protocols) on the locality prompts of the K records after "
                        "the first max(--sizes), which no call edits (JSON: each point's 'unedited'): a larger locality sample than "
                        "the N edited records' own (default 0: none)")
    add_rounds_arguments(b, "every N-edit call (the --singles are made as the editor makes them: its calibrated weight and rounds)", 1)
    add_key_memory_arguments(b, "every call's solve", past=False)
    b.add_argument("--restart", action="store_true",
                   help="ignore an unfinished FILE.json of the same study (by default the run resumes it: the N-edit calls it "
                        "holds are kept, not made again; the --singles are made again)")
    b.set_defaults(func=run_batch)

    s = studies.add_parser("sequential", help="lifelong editing: reliability of all edits so far, locality and perplexity against edits",
                           description="Applies --edits records one call after another (--batch per call); after 1, 2, 4, ... edits "
                                       "scores every edit so far, the locality and the perplexity of a held-out text sample; rolls back "
                                       "bit for bit at the end (checked). FILE.json is rewritten after every scored point.")
    _study_arguments(s, "sequential")
    s.add_argument("--edits", type=int, default=1000, metavar="T", help="edits in total (default 1000)")
    s.add_argument("--batch", type=int, default=1, metavar="K", help="edits per call (default 1: one after another)")
    s.add_argument("--held-out", type=int, default=200, metavar="N",
                   help="records after the edited ones whose locality prompts + answers form the perplexity sample "
                        f"(default 200; at least {MIN_PERPLEXITY_TEXTS} texts)")
    s.add_argument("--held-out-data", default=None, metavar="FILE",
                   help="take the perplexity sample from the first --held-out records of this data file instead")
    add_key_memory_arguments(s, "every call's solve")
    s.add_argument("--restart", action="store_true",
                   help="ignore an unfinished FILE.json of the same study (by default the run resumes it: the edits are replayed, "
                        "the points it holds are kept, not scored again)")
    s.set_defaults(func=run_sequential)


def _forms_argument(value: str) -> tuple[str, ...]:
    """``wrapped,chat`` -> ("wrapped", "chat") in ``EDIT_FORMS`` order (an argparse ``type``)."""
    try:
        return check_edit_forms(value, "forms")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _study_arguments(p: argparse.ArgumentParser, study: str) -> None:
    p.add_argument("--editor", action="append", required=True, metavar="DIR",
                   help="a trained editor folder (RUN/best); repeat to compare editors, e.g. a sum and a least_squares one")
    p.add_argument("--label", action="append", default=[], metavar="NAME", help="name of each --editor (default: the run folder's name)")
    p.add_argument("--model", default=None, help="model to edit (default: the editor's model_name)")
    p.add_argument("--task", default="zsre", choices=TASKS, help="task of the records and their instruction (default zsre)")
    p.add_argument("--data", default=None, metavar="FILE", help="edit the records of this data file (format auto-detected) instead of the split")
    p.add_argument("--data-dir", default=None, help="data folder (default: $INSTRUCTEDIT_DATA or ../shared/data)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split of the task (default test; ZsRE's is the held-out file)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test splits (default 0)")
    p.add_argument("--instruction", default="seen", help="'seen' (default, as the editor was trained), 'unseen', a description index, or 'none'")
    p.add_argument("--protocol", default="both", choices=PROTOCOLS, help="both (default) or teacher_forced only (no greedy answers)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="most probe rows per forward pass")
    p.add_argument("--seed", type=int, default=0, help="torch seed (default 0)")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--output", default=None, metavar="FILE.json",
                   help=f"results file (default results/analysis/{study}-<label>.json); the figure goes beside it as FILE.png")
    p.add_argument("--edit-forms", type=_forms_argument, default=None, metavar="F,F",
                   help="make every call's edits in these forms of the edit prompt, solved together (wrapped, plain, chat; "
                        "default: as the editor makes them, in its edit_forms, and in its many_edit_forms in calls of more than "
                        "16 edits and edits kept one after another)")
    p.add_argument("--ask-forms", type=_forms_argument, default=(), metavar="F,F",
                   help="under generation, ask each edit prompt in these forms (wrapped, plain: the bare question, chat: the "
                        "question as a chat user turn; JSON gen_reliability, gen_reliability_plain, gen_reliability_chat); "
                        "wrapped is always asked (default: the editor's edit_forms)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@dataclass
class _Loaded:
    """One ``--editor``, ready: its editor, the model it edits, how its edit inputs are built, and its entry in the JSON."""

    editor: Any
    model: Any
    tokenizer: Any
    collator: Any
    instruction: int | None
    entry: dict[str, Any]


def _load(args: argparse.Namespace, path: str, label: str) -> _Loaded:
    """The editor with the instruction, template, answer stop and edit forms it was trained with, and its model (``--model`` or its own)."""
    from instructedit.commands.common import load_editor_and_model
    from instructedit.models.loading import max_input_length, resolve_device
    from instructedit.tasks.collate import Collator

    wrapper, model, tokenizer, name = load_editor_and_model(path, args.model, args.instruction, resolve_device(args.device))
    editor = wrapper.editor_for(model, tokenizer)
    forms = args.edit_forms or wrapper.edit_forms
    collator = Collator(tokenizer, max_input_length(model), wrapper.pool, answer_stop=wrapper.answer_stop, edit_forms=forms)
    entry = {"label": label, "editor": str(path), "aggregation": aggregation(editor), "model": name, "instruction": wrapper.instruction,
             "answer_stop": wrapper.answer_stop, "edit_forms": list(forms), "calibrated_edit_rounds": wrapper.edit_rounds,
             "many_edit_forms": list(args.edit_forms or wrapper.many_edit_forms), "calibrated_many_edit_scale": wrapper.many_edit_scale,
             "points": []}
    if args.edit_forms:
        entry["calibrated_edit_forms"] = {"edit_forms": list(wrapper.edit_forms), "many_edit_forms": list(wrapper.many_edit_forms)}
    entry["asked_forms"] = list(check_edit_forms(["wrapped", *(f for f in args.ask_forms or wrapper.edit_forms if f != "wrapped")]))
    if "chat" in entry["asked_forms"] and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--ask-forms chat: {name}'s tokenizer has no chat template to ask the question in")
    own = getattr(editor, "preservation", None)
    if own is not None:  # the editor's own preservation sample (instructedit calibrate --preserve): every solve holds it still
        entry["preservation"] = {"weight": own.text_weight, "source": editor.preservation_source}
    logger.info("%s: %s editor (aggregation %s) on %s, instruction %s", label, type(editor).__name__, entry["aggregation"], name, wrapper.instruction)
    return _Loaded(editor, model, tokenizer, collator, wrapper.instruction, entry)


def _records(args: argparse.Namespace, data: str | None, needed: int, option: str) -> tuple[list[EditRecord], dict[str, Any]]:
    """The task's records (``data``: a file instead of the split); ValueError naming ``option`` when fewer than ``needed``."""

    records, where, _ = load_eval_records(args.task, data, args.data_dir, args.split, args.split_seed)
    if len(records) < needed:
        source = data or f"the {args.task} {args.split} split"
        raise ValueError(f"{option} needs {needed} records but {source} has {len(records)}: use at most {len(records)} or a larger file")
    return records, where


def _output(args: argparse.Namespace, study: str, labels: list[str]) -> Path:
    path = Path(args.output) if args.output else Path("results") / "analysis" / f"{study}-{'+'.join(labels)}.json"
    if path.suffix != ".json":
        raise ValueError(f"--output {path} must end in .json (the figure goes beside it as {path.with_suffix('.png').name})")
    return path


def _labels(args: argparse.Namespace) -> list[str]:
    from instructedit.analysis.gradients import default_label

    return [label or default_label(path) for path, label in zip(args.editor, per_editor(args.label, args.editor, "--label", None))]


def _header(args: argparse.Namespace, study: str, where: dict[str, Any]) -> dict[str, Any]:
    argv = getattr(args, "argv", None)  # set by cli.main
    return {"study": study, "command": shlex.join(["instructedit", *argv]) if argv is not None else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "task": args.task, **where,
            "protocol": args.protocol, "seed": args.seed, "complete": False, "editors": []}


def _write(path: Path, result: dict[str, Any], panels: tuple[tuple[str, str], ...], title: str) -> None:
    from instructedit.analysis.plots import edits_curves
    from instructedit.io import write_json

    write_json(path, result)
    edits_curves(path.with_suffix(".png"), result["editors"], panels, title)


ANSWERS_SAID = {"data": "answers", "model": "the unedited model's greedy answers",  # --preserve-answers, in a result's words
                "both": "answers and (again) the unedited model's greedy answers"}
RESUME_KEYS = ("study", "task", "data_file", "split", "split_seed", "protocol", "seed", "edits", "batch", "held_out", "memory")
BATCH_RESUME_KEYS = ("study", "task", "data_file", "split", "split_seed", "start", "distinct_subjects", "unedited_locality", "protocol",
                     "seed", "singles", "rounds", "memory")
# an editor's entry in a sequential study: what its edits depend on beside the study's settings
SEQUENTIAL_ENTRY_KEYS = ("calibrated_many_edit_scale", "many_edit_forms", "asked_forms")
# an editor's entry in a batch study: what its points depend on beside the study's settings (a resumed run must load it so)
ENTRY_KEYS = ("aggregation", "model", "instruction", "answer_stop", "edit_forms", "many_edit_forms", "asked_forms", "calibrated_edit_rounds",
              "calibrated_many_edit_scale", "ls_keys", "preservation")


def _preservation_texts(args: argparse.Namespace, held_out: list[EditRecord]) -> list[tuple[str, str]]:
    """The (prompt, answer) texts whose keys --key-memory holds still (--preserve-data), without those of ``held_out``'s
    locality prompts (what the study measures: the perplexity sample, the edited records' locality)."""
    from instructedit.analysis.many_edits import locality_texts, without_measured

    check_key_memory_arguments(args)
    if args.preserve_data is None:
        return []
    if args.preserve_data in (EDITOR_TEXTS, NO_TEXTS):
        raise ValueError(f"--preserve-data {args.preserve_data}: edit and evaluate take it; analyze's sample is a data FILE's "
                         "locality prompts")
    end = args.preserve_start + args.preserve
    records = _records(args, args.preserve_data, end, f"--preserve-start {args.preserve_start} --preserve {args.preserve}")[0][args.preserve_start : end]
    texts = locality_texts(records)
    if not texts:
        raise ValueError(f"records {args.preserve_start}..{end - 1} of --preserve-data {args.preserve_data} have no locality prompts")
    return without_measured(texts, set(locality_texts(held_out)), f"--preserve-data {args.preserve_data}", "the study")


def _unfinished(output: Path, result: dict[str, Any], editors: list[str], labels: list[str],
                keys: tuple[str, ...] = RESUME_KEYS) -> dict[str, Any]:
    """The unfinished results of the same study in ``output`` (to resume), {} when there are none; ``keys``: the settings
    that must be the same.

    ValueError when ``output`` holds an unfinished run of a different study (it would be overwritten)."""
    import json

    if not output.exists():
        return {}
    try:
        earlier = json.loads(output.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{output} exists but is not readable JSON ({exc}); move it away or pass --restart") from exc
    if not isinstance(earlier, dict) or earlier.get("complete", True):
        return {}  # a finished study is simply redone
    differ = [k for k in keys if earlier.get(k) != result.get(k)]
    ours = list(zip(map(str, editors), labels))
    theirs = [(e.get("editor"), e.get("label")) for e in earlier.get("editors", [])]
    if theirs != ours[: len(theirs)]:
        differ.append("editors")
    if differ:
        raise ValueError(f"{output} holds an unfinished {result['study']} study with different {', '.join(differ)} "
                         f"(e.g. {differ[0]}: {earlier.get(differ[0])!r}); pass --restart to overwrite it or --output another file")
    return earlier


def _pct(summary: dict[str, Any] | None) -> str:
    return "–" if summary is None else f"{100 * summary['mean']:.1f}"


def _line(label: str, p: dict[str, Any]) -> str:
    scores = ", ".join(f"{k} {_pct(p.get(k))}/{_pct(p.get('gen_' + k))}" for k in ("reliability", "generalization", "locality"))
    asked = [f"{form} {_pct(p[f'gen_reliability_{form}'])}" for form in ("plain", "chat") if p.get(f"gen_reliability_{form}")]
    if asked:
        scores += f" (said, generation: {', '.join(asked)})"
    extra = f"{p['seconds_per_edit']:.4f} s/edit" if "seconds_per_edit" in p else f"perplexity ×{p['perplexity_ratio']:.3f}"
    rounds = p.get("rounds", 1)
    kept = p.get("rounds_made", rounds)
    parts = [] if rounds == 1 and p.get("sample_weight") is None else [f"{rounds} round{'s' if rounds != 1 else ''}"]
    if kept != rounds:
        parts = [f"{kept} of {rounds} rounds: a round that raised the edits' loss was undone"]
    if p.get("sample_weight") is not None:
        parts.append(f"sample weight {p['sample_weight']:g}")
    if p.get("step_scale", 1.0) != 1.0:
        parts.append(f"step sizes x {p['step_scale']:g}")
    if p.get("refused"):
        from instructedit.editors.base import OUTLIER_FACTOR

        parts.append(f"{p['refused']} not kept: each would have wrecked the model (a weight moved {OUTLIER_FACTOR:g}× the usual)")
    made = f" ({', '.join(parts)})" if parts else ""
    return f"{label} N={p['n_edits']}{made}: {scores} (teacher-forced/generation %), {extra}"


def run_batch(args: argparse.Namespace) -> int:
    import torch

    from instructedit.analysis.many_edits import batch_study, key_memory

    labels = _labels(args)
    output = _output(args, "batch", labels)
    if args.unedited_locality < 0:
        raise ValueError(f"--unedited-locality must be >= 0, got {args.unedited_locality}")
    if args.start < 0:
        raise ValueError(f"--start must be >= 0, got {args.start}")
    wanted = max(args.sizes) + args.unedited_locality
    option = (f"--start {args.start} " if args.start else "") + f"--sizes {max(args.sizes)}" + (
        f" with --unedited-locality {args.unedited_locality}" if args.unedited_locality else "")
    records, where = _records(args, args.data, 0 if args.distinct_subjects else args.start + wanted, option)
    if args.start:
        records = records[args.start :]
        where = {**where, "start": args.start}
    if args.distinct_subjects:
        from instructedit.analysis.many_edits import distinct_subjects

        kept = distinct_subjects(records)
        if len(kept) < wanted:
            raise ValueError(f"--distinct-subjects {option}: the {len(records)} records have {len(kept)} distinct subjects")
        scanned = records.index(kept[max(args.sizes) - 1]) + 1
        span = f"the first {scanned} records" if not args.start else f"records {args.start}..{args.start + scanned - 1}"
        where = {**where, "distinct_subjects": f"the first record of each subject: {max(args.sizes)} of {span}"}
        records = kept
    unedited = records[max(args.sizes) : wanted]
    if unedited:
        which = (f"the {len(unedited)} distinct-subject records after the edited ones" if args.distinct_subjects
                 else f"records {args.start + max(args.sizes)}..{args.start + wanted - 1}")
        where = {**where, "unedited_locality": f"the locality prompts of {which}, never edited"}
    preserve = _preservation_texts(args, records[:wanted])
    if args.key_memory and not preserve:
        raise ValueError("--key-memory in analyze batch holds a preservation sample still: add --preserve-data FILE")
    if isinstance(args.rounds, int) and args.rounds < 1:
        raise ValueError(f"--rounds must be >= 1 or auto, got {args.rounds}")
    if args.sample_weight is not None and args.sample_weight <= 0:
        raise ValueError(f"--sample-weight must be > 0, got {args.sample_weight}")
    result = {**_header(args, "batch", where), "sizes": list(args.sizes), "singles": args.singles, "rounds": args.rounds,
              "memory": None if not preserve else {"text_weight": args.preserve_weight, "answers": args.preserve_answers,
                                                   "keys": args.preserve_keys,
                                                   "text": f"the locality prompts + {ANSWERS_SAID[args.preserve_answers]} of records "
                                                   f"{args.preserve_start}..{args.preserve_start + args.preserve - 1} of {args.preserve_data}"}}
    earlier = {} if args.restart else _unfinished(output, result, args.editor, labels, BATCH_RESUME_KEYS)
    if earlier:
        result["resumed"] = {"date": earlier["date"], "command": earlier["command"]}
    title = f"{args.task}: N edits in one call"
    for path, label in zip(args.editor, labels):
        before = next((e for e in earlier.get("editors", ()) if (e["editor"], e["label"]) == (str(path), label)), None)
        if before is not None and "rolled_back_bitwise" in before:  # this editor had finished
            result["editors"].append(before)
            _print_batch(label, before)
            continue
        torch.manual_seed(args.seed)
        loaded = _load(args, path, label)
        if args.ls_keys is not None:
            if loaded.entry["aggregation"] != "least_squares":
                raise ValueError(f"--ls-keys: {path} is a {loaded.entry['aggregation']!r} editor; the option shapes least-squares solves only")
            loaded.editor.config = dataclasses.replace(loaded.editor.config, ls_keys=args.ls_keys)
        if loaded.entry["aggregation"] == "least_squares":
            loaded.entry["ls_keys"] = loaded.editor.config.ls_keys
        if args.sample_weight is not None:
            if getattr(loaded.editor, "preservation", None) is None:
                raise ValueError(f"--sample-weight: {path} has no preservation sample of its own (instructedit calibrate --preserve "
                                 "saves one); --key-memory --preserve-data FILE --preserve-weight W brings one")
            loaded.entry["preservation"]["weight_in_calls"] = args.sample_weight
        entry = loaded.entry
        if before is not None:
            differ = [k for k in ENTRY_KEYS if before.get(k) != entry.get(k)]
            if differ:
                raise ValueError(f"{output}: {label}'s calls were made with another {', '.join(differ)} (e.g. {differ[0]}: "
                                 f"{before.get(differ[0])!r} then, {entry.get(differ[0])!r} now); pass --restart to start over")
            entry["points"] = list(before["points"])
            logger.info("%s: resuming %s, the calls of %s edits kept (not made again)", label, output,
                        ", ".join(str(p["n_edits"]) for p in entry["points"]) or "no")
        result["editors"].append(entry)

        def on_point(point: dict[str, Any], entry: dict[str, Any] = entry) -> None:
            entry["points"].append(point)
            _write(output, result, BATCH_PANELS, title)  # a long study keeps the calls it has made

        memory = key_memory(loaded.editor, loaded.model, loaded.collator, preserve, 0.0, args.preserve_weight, args.batch_size,
                            args.preserve_answers, args.preserve_keys) if preserve else None
        out = batch_study(loaded.model, loaded.tokenizer, loaded.editor, loaded.collator, records, loaded.instruction, args.sizes,
                          generation=args.protocol == "both", batch_size=args.batch_size, progress=not args.no_progress,
                          memory=memory, singles=args.singles, rounds=args.rounds, sample_weight=args.sample_weight, unedited=unedited,
                          single_rounds=entry["calibrated_edit_rounds"], many_edit_scale=entry["calibrated_many_edit_scale"],
                          scored={p["n_edits"]: p for p in entry["points"]}, on_point=on_point,
                          ask_forms=entry["asked_forms"], many_forms=entry["many_edit_forms"])
        entry.update({**out, "rolled_back_bitwise": True})  # batch_study verifies it after every N
        _write(output, result, BATCH_PANELS, title)
        _print_batch(label, entry)
    result["complete"] = True
    _write(output, result, BATCH_PANELS, title)
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return 0


def _print_batch(label: str, entry: dict[str, Any]) -> None:
    """An editor's batch-study results, a line per N (and its single edits)."""
    if "single" in entry:
        print(_line(f"{label} (each edit alone)", entry["single"]))
    for p in entry["points"]:
        print(_line(label, p))
        if "unedited" in p:
            u = p["unedited"]
            print(f"  locality on {u['n_prompts']} prompts of {u['n_cases']} unedited records: "
                  f"{_pct(u.get('locality'))}/{_pct(u.get('gen_locality'))} (teacher-forced/generation %)")
        if any(v is not None for v in p.get("kept_of_single", {}).values()):
            kept = ", ".join(f"{'generation' if k.startswith('gen_') else 'teacher-forced'} {100 * v:.0f} %"
                             for k, v in p["kept_of_single"].items() if v is not None)
            print(f"  kept of the same {p['n_edits']} cases' single-edit reliability: {kept}")


def run_sequential(args: argparse.Namespace) -> int:
    import torch

    from instructedit.analysis.many_edits import key_memory, sequential_study

    for option, value in (("--edits", args.edits), ("--batch", args.batch), ("--held-out", args.held_out)):
        if value < 1:
            raise ValueError(f"{option} must be >= 1, got {value}")
    labels = _labels(args)
    output = _output(args, "sequential", labels)
    if args.held_out_data:
        records, where = _records(args, args.data, args.edits, "--edits")
        held_out = _records(args, args.held_out_data, 0, "--held-out")[0][: args.held_out]
        source = f"the first {len(held_out)} records of --held-out-data {args.held_out_data}"
    else:
        records, where = _records(args, args.data, args.edits, "--edits")
        held_out = records[args.edits : args.edits + args.held_out]
        source = f"the {len(held_out)} records after the {args.edits} edited ones"
    texts = sum(len(r.locality) for r in held_out)
    if texts < MIN_PERPLEXITY_TEXTS:
        more = "raise --held-out, " if len(held_out) == args.held_out else ""
        raise ValueError(f"the perplexity sample needs at least {MIN_PERPLEXITY_TEXTS} held-out texts; {source} give {texts} "
                         f"locality prompts: {more}lower --edits or pass --held-out-data FILE (records never edited, e.g. another split's file)")
    preserve = _preservation_texts(args, held_out)
    memory_settings = None if not args.key_memory else {
        "past_weight": args.past_weight, "text_weight": args.preserve_weight if preserve else 0.0,
        "answers": args.preserve_answers if preserve else None, "keys": args.preserve_keys if preserve else None,
        "text": f"the locality prompts + {ANSWERS_SAID[args.preserve_answers]} of records {args.preserve_start}..{args.preserve_start + args.preserve - 1} of "
                f"{args.preserve_data}" if preserve else None}
    result = {**_header(args, "sequential", where), "edits": args.edits, "batch": args.batch, "held_out": source, "memory": memory_settings}
    earlier = {} if args.restart else _unfinished(output, result, args.editor, labels)
    if earlier:
        result["resumed"] = {"date": earlier["date"], "command": earlier["command"]}
    title = f"{args.task}: {args.edits} edits, {args.batch} per call"
    for path, label in zip(args.editor, labels):
        before = next((e for e in earlier.get("editors", ()) if (e["editor"], e["label"]) == (str(path), label)), None)
        if before is not None and "rolled_back_bitwise" in before:  # this editor had finished
            result["editors"].append(before)
            continue
        torch.manual_seed(args.seed)
        loaded = _load(args, path, label)
        entry = loaded.entry
        # a file from before a key was recorded made its edits at step sizes x 1 in its edit forms and asked the wrapped prompt
        old = {"calibrated_many_edit_scale": 1.0, "many_edit_forms": (before or {}).get("edit_forms", ["wrapped"]), "asked_forms": ["wrapped"]}
        differ = [k for k in SEQUENTIAL_ENTRY_KEYS if before is not None and before.get(k, old[k]) != entry[k]]
        if differ:
            raise ValueError(f"{output}: {label}'s edits were made with another {', '.join(differ)} (e.g. {differ[0]}: "
                             f"{before.get(differ[0])!r} then, {entry[differ[0]]!r} now); pass --restart to start over")
        entry["points"] = list(before["points"]) if before is not None else []
        result["editors"].append(entry)
        if entry["points"]:
            logger.info("%s: resuming %s, %d points kept (up to %d edits; the edits are replayed, those points not scored again)",
                        label, output, len(entry["points"]), entry["points"][-1]["n_edits"])

        def on_point(point: dict[str, Any], entry: dict[str, Any] = entry, label: str = label) -> None:
            entry["points"].append(point)
            _write(output, result, SEQUENTIAL_PANELS, title)  # a long run keeps what it has scored
            print(_line(label, point), flush=True)

        memory = key_memory(loaded.editor, loaded.model, loaded.collator, preserve, args.past_weight, args.preserve_weight if preserve else 0.0,
                            args.batch_size, args.preserve_answers, args.preserve_keys) if args.key_memory else None
        out = sequential_study(loaded.model, loaded.tokenizer, loaded.editor, loaded.collator, records, held_out, loaded.instruction,
                               args.edits, batch=args.batch, generation=args.protocol == "both", batch_size=args.batch_size,
                               progress=not args.no_progress, on_point=on_point, scored={p["n_edits"] for p in entry["points"]},
                               memory=memory, step_scale=entry["calibrated_many_edit_scale"], forms=entry["many_edit_forms"],
                               ask_forms=entry["asked_forms"])
        if memory is not None:
            entry["memory"] = memory.state()
        entry.update({k: v for k, v in out.items() if k != "points"})  # base perplexity, texts, rolled_back_bitwise (checked)
    result["complete"] = True
    _write(output, result, SEQUENTIAL_PANELS, title)
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return 0
