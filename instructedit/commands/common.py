"""Arguments and helpers that several subcommands share (the editor to apply, the model it was trained for)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from instructedit.config import DEFAULT_MODEL, PRESERVE_ANSWERS, PRESERVE_KEYS
from instructedit.records import EditRecord
from instructedit.runs import PRESERVATION_TEXTS

logger = logging.getLogger(__name__)


def rounds_argument(text: str) -> int | str:
    """argparse type of ``--rounds``: a whole number, or "auto" (``editors.learned.schedule_for``)."""
    from instructedit.editors.learned import AUTO_ROUNDS

    if text.strip().lower() == AUTO_ROUNDS:
        return AUTO_ROUNDS
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor {AUTO_ROUNDS!r}") from None


def add_rounds_arguments(parser: argparse.ArgumentParser, calls: str, default: int | str) -> None:
    """``--rounds`` and ``--sample-weight``: how ``calls`` (the parser's many-edit calls) are made
    (``editors.learned.schedule_for``, ``sample_weighted``)."""
    parser.add_argument("--rounds", type=rounds_argument, default=default, metavar="K|auto",
                        help=f"{calls}: compute the update K times, each on the model the earlier rounds edited (MEND editors; "
                             f"default {default}); 'auto': for a least-squares editor with its own preservation sample and N > 16 "
                             "edits, ceil(sqrt(N)/2) rounds with the sample weighted sqrt(N) times (unless --sample-weight), else 1")
    parser.add_argument("--sample-weight", type=float, default=None, metavar="W",
                        help=f"{calls}, a least-squares editor with its own preservation sample (calibrate --preserve): count the "
                             "sample as W tokens in the call's solves instead of its calibrated weight (more holds more of the "
                             "model's other answers; more --rounds buy the edits back)")


def load_eval_records(task: str, data: str | None, data_dir: str | None, split: str,
                      seed: int) -> tuple[list[EditRecord], dict[str, Any], list[dict[str, Any]]]:
    """Records of ``--data FILE`` (format auto-detected, records labelled ``task``) or of the task's split.

    Also returns the records the loader skipped (report entries, ``report.load_skips``): for a split,
    those of the files it is drawn from.
    """
    from instructedit.evaluation.report import load_skips
    from instructedit.tasks.loaders import load_records
    from instructedit.tasks.splits import TASK_SOURCES, load_task_splits

    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"--data {path} does not exist")
        result = load_records(path, task=task)
        return result.records, {"data_file": str(path), "split": None, "split_seed": None}, load_skips(path, result.skipped)
    splits = load_task_splits(task, data_dir, seed=seed)
    source = TASK_SOURCES[task]
    files = source.test if split == "test" and source.test else source.pool
    skipped = [entry for rel in files for entry in load_skips(rel, splits.skipped.get(rel, []))]
    return splits.split(split), {"data_file": None, "split": split, "split_seed": seed}, skipped


def key_memory_from_arguments(args: argparse.Namespace, editor: Any, model: Any, tokenizer: Any,
                              measured: set[tuple[str, str]] | None = None) -> tuple[Any, int]:
    """The ``KeyMemory`` that ``--key-memory`` and its options (``check_key_memory_arguments``, already run) ask for, as
    ``edit --sequential`` and ``evaluate --sequential`` build it: earlier edits' keys at ``--past-weight`` and, with
    ``--preserve-data``, the locality prompts of its records ``--preserve-start``.. as the preservation sample (``editor``:
    the texts saved with the editor's own sample, ``MENDEditor.preservation_texts``); also the
    sample's text count. ``editor``: the least-squares editor whose solves hold it. ``measured``: (prompt, answer) texts
    the caller scores locality on; the sample leaves them out (with a warning), since holding them still would flatter
    the score."""
    from instructedit.analysis.many_edits import key_memory, locality_texts, without_measured
    from instructedit.models.loading import max_input_length
    from instructedit.tasks.collate import Collator

    texts: list[tuple[str, str]] = []
    if args.preserve_data == EDITOR_TEXTS:
        texts = list(getattr(editor, "preservation_texts", []))
        if not texts and not getattr(args, "sample_default", False):
            raise ValueError(f"--preserve-data {EDITOR_TEXTS}: {args.editor} has no preservation texts saved with it "
                             f"({PRESERVATION_TEXTS}: calibrate --preserve writes them); give --preserve-data FILE")
        if texts:
            texts = without_measured(texts, measured or set(), f"the preservation texts of {args.editor}", "this run")
        else:  # the default sample, which an older editor lacks: the memory holds no sample of its own
            logger.info("%s has no preservation texts saved with it (%s): the key memory holds earlier edits beside its own "
                        "sample", args.editor, PRESERVATION_TEXTS)
    elif args.preserve_data and args.preserve_data != NO_TEXTS:
        end = args.preserve_start + args.preserve
        records = load_eval_records(args.task, args.preserve_data, None, "test", 0)[0][args.preserve_start : end]
        texts = locality_texts(records)
        if not texts:
            raise ValueError(f"--preserve-data {args.preserve_data}: its records {args.preserve_start}..{end - 1} have no locality prompts")
        texts = without_measured(texts, measured or set(), f"--preserve-data {args.preserve_data}", "this run")
    bar = None if getattr(args, "no_progress", False) else f"the key memory's sample: the model's answers to {len(texts)} texts"
    memory = key_memory(editor, model, Collator(tokenizer, max_input_length(model)), texts, args.past_weight,
                        args.preserve_weight if texts else 0.0, answers=args.preserve_answers, keys=args.preserve_keys, progress=bar)
    return memory, len(texts)


def add_editor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--editor`` and ``--model``, as every command that applies a trained editor takes them."""
    parser.add_argument("--editor", required=True, metavar="DIR|ORG/NAME", help="a trained editor folder (e.g. RUN/best) or a hub repo id")
    parser.add_argument("--model", default=None, help=f"model to edit (default: the editor's model_name, else {DEFAULT_MODEL})")


def load_editor_model(editor_dir: str, model: str | None, device: str) -> tuple[Any, Any, str]:
    """The model ``--model`` names, else the one the editor folder was trained for, else the default; with its tokenizer and name."""
    from instructedit.editors.card import editor_model_name
    from instructedit.models.loading import load_model

    name = model or editor_model_name(editor_dir) or DEFAULT_MODEL
    m, tok = load_model(name, device=device)
    return m, tok, name


def load_editor_and_model(source: str, model: str | None, instruction: str | None, device: str,
                          dtype: str = "float32", answer_stop: str | None = None) -> tuple[Any, Any, Any, str]:
    """A trained editor (``api.load_editor``: instruction, template and answer stop as it was trained; ``answer_stop``, from
    ``--answer-stop``: its edits made with this one instead) and the model to edit.

    The model is the one ``--model`` names, else the one the editor was trained for, else the default, loaded in
    ``dtype`` (``--dtype``); returned with its tokenizer and name: ``(editor, model, tokenizer, name)``.
    """
    from instructedit.api import load_editor
    from instructedit.models.loading import load_model

    editor = load_editor(source, instruction=instruction, device=device)
    if answer_stop is not None:
        editor.answer_stop = answer_stop
    name = model or editor.model_name or DEFAULT_MODEL
    m, tok = load_model(name, dtype=dtype, device=device)
    return editor, m, tok, name


def add_answer_stop_argument(parser: argparse.ArgumentParser) -> None:
    """``--answer-stop``: what each edit input's answer ends with, in place of the editor's saved ``answer_stop``."""
    from instructedit.config import ANSWER_STOPS

    parser.add_argument("--answer-stop", default=None, choices=ANSWER_STOPS,
                        help="what each edit input's answer ends with (default: the editor's answer_stop from its editor_config.json); "
                             "newline+turn ends the chat form's answer with the end of the turn, so that an edited chat reply stops "
                             "after the answer (results/analysis/plain-edit-row/more-rounds/)")


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--dtype``: the precision the model to edit is loaded in (the editor's own weights stay float32)."""
    from instructedit.models.loading import DTYPES

    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="precision of the model's weights (default float32; bfloat16 halves a large model's memory on a "
                             "GPU; the editor stays float32 and each edit is added in float32, then rounded once)")


def per_editor(values: list[str], editors: list[str], flag: str, default: Any) -> list[Any]:
    """One value of a repeatable option per ``--editor`` (``default`` for each when the option is not given)."""
    if not values:
        return [default] * len(editors)
    if len(values) != len(editors):
        raise ValueError(f"{flag} was given {len(values)} time(s) for {len(editors)} --editor(s); give it once per --editor or not at all")
    return values


def aggregation(editor: Any) -> str:
    """How ``editor`` combines the edits of one call: its ``editor.aggregation`` (MEND: sum or least_squares); others sum."""
    return getattr(getattr(editor, "config", None), "aggregation", "sum")


PRESERVE_RECORDS, PRESERVE_WEIGHT = 400, 1000.0  # the preservation sample's defaults (results/analysis/lifelong-memory-dev/)
EDITOR_TEXTS = "editor"  # --preserve-data editor: the texts of the editor's own preservation sample (calibrate --preserve)
NO_TEXTS = "none"  # --preserve-data none: the key memory holds no sample of its own (earlier edits, beside the editor's sample)


def add_key_memory_arguments(parser: argparse.ArgumentParser, what: str, past: bool = True, also: str = "",
                             with_neighbours: bool = False) -> None:
    """``--key-memory`` and the options that shape it, as ``edit --sequential`` and ``analyze sequential`` take them;
    ``what``: which solves hold the earlier keys still. ``past=False``: calls that are rolled back (``analyze batch``)
    leave no earlier keys, so the memory is the preservation sample alone and there is no ``--past-weight``.
    ``also``: appended to ``--key-memory``'s help. ``with_neighbours``: the command also takes ``--neighbours``, and
    ``--key-memory`` is on by default for ``--sequential --neighbours`` (``--no-key-memory`` leaves it out;
    ``key_memory_by_default`` decides). ``check_key_memory_arguments`` checks and completes them."""
    from instructedit.editors.neighbours import SEQUENCE_EVIDENCE, SEQUENCE_SAMPLE_ANSWERS, SEQUENCE_SAMPLE_WEIGHT

    held = "the keys of the edits made before it" if past else "the keys of a preservation sample (--preserve-data)"
    default = ("; on by default with --sequential --neighbours, which without one broke on CounterFact in some draws "
               f"({SEQUENCE_EVIDENCE}; --no-key-memory leaves it out), and then, with no --preserve-* option, holding the "
               f"editor's own texts continued with the model's answers (--preserve-data {EDITOR_TEXTS} --preserve-answers "
               f"{SEQUENCE_SAMPLE_ANSWERS} --preserve-weight {SEQUENCE_SAMPLE_WEIGHT:g})") if with_neighbours else ""
    parser.add_argument("--key-memory", action=argparse.BooleanOptionalAction if with_neighbours else "store_true",
                        default=None if with_neighbours else False,
                        help=f"{'lifelong least-squares editing: ' if past else ''}{what} holds {held} still{also}{default} "
                             "(editors/aggregation.py KeyMemory; least_squares editors only)")
    if past:
        parser.add_argument("--past-weight", type=float, default=None, metavar="W", help="--key-memory: weight of the earlier edits' keys (default 1)")
    else:
        parser.set_defaults(past_weight=None)
    parser.add_argument("--preserve-data", default=None, metavar="FILE",
                        help="--key-memory: also hold still the keys of a preservation sample, the locality prompts + answers of "
                             "--preserve records of FILE (a data file of --task's format) from --preserve-start; "
                             f"'{EDITOR_TEXTS}': the texts of the editor's own sample (calibrate --preserve saves them); "
                             f"'{NO_TEXTS}': no sample of its own (the earlier edits' keys beside the editor's own sample)")
    parser.add_argument("--preserve", type=int, default=None, metavar="N", help=f"records of --preserve-data (default {PRESERVE_RECORDS})")
    parser.add_argument("--preserve-start", type=int, default=None, metavar="K", help="skip the first K records of --preserve-data (default 0)")
    parser.add_argument("--preserve-weight", type=float, default=None, metavar="W",
                        help=f"the preservation sample's mean key covariance counted as W tokens (default {PRESERVE_WEIGHT:g})")
    parser.add_argument("--preserve-answers", choices=PRESERVE_ANSWERS, default=None,
                        help="the preservation sample's continuations: the locality answers of --preserve-data (data, the default) "
                             "or what the unedited model says to each prompt (model: greedy, as generation locality asks), or "
                             "each prompt once with each (both)")
    parser.add_argument("--preserve-keys", choices=PRESERVE_KEYS, default=None,
                        help="which positions' keys of the preservation sample are held still: every one (all, the default) or "
                             "those that predict the answer (answer: the prompt's last and the answer's)")


def key_memory_by_default(args: argparse.Namespace, sequential: bool) -> None:
    """``--key-memory`` left unsaid (None) decided: on for edits kept one after another with neighbours
    (``--sequential --neighbours``), off otherwise; ``args.key_memory_default`` says whether it was so decided.

    Such a memory with no preservation sample named (no ``--preserve-*`` option) holds the editor's own texts continued
    with what the model says, as ``apply_sequential(memory="auto")`` does: ``--preserve-data editor --preserve-answers
    model --preserve-weight 4000``; ``args.sample_default`` says so (an editor without saved texts then holds none:
    ``key_memory_from_arguments``)."""
    from instructedit.editors.neighbours import SEQUENCE_SAMPLE_ANSWERS, SEQUENCE_SAMPLE_WEIGHT

    args.key_memory_default = args.key_memory is None
    if args.key_memory is None:
        args.key_memory = sequential and args.neighbours is not None
    named = (args.preserve_data, args.preserve, args.preserve_start, args.preserve_weight, args.preserve_answers, args.preserve_keys)
    args.sample_default = bool(args.key_memory and sequential and args.neighbours is not None and all(v is None for v in named))
    if args.sample_default:
        args.preserve_data, args.preserve_answers, args.preserve_weight = EDITOR_TEXTS, SEQUENCE_SAMPLE_ANSWERS, SEQUENCE_SAMPLE_WEIGHT


def check_key_memory_arguments(args: argparse.Namespace, needs: str = "--key-memory", sequential: bool | None = None) -> None:
    """Options that shape a key memory only with ``--key-memory`` (``needs``: what the command asks for), the
    preservation sample's only with ``--preserve-data``; fills in the defaults. ``sequential``: whether the command's edits
    are kept one after another (``--sequential``), which a key memory needs; None: the command has no such choice."""
    if args.key_memory and sequential is False:
        raise ValueError("--key-memory holds earlier edits still while edits are kept one after another: add --sequential")
    given = {flag: value for flag, value in (("--past-weight", args.past_weight), ("--preserve-data", args.preserve_data),
                                              ("--preserve", args.preserve), ("--preserve-start", args.preserve_start),
                                              ("--preserve-weight", args.preserve_weight),
                                              ("--preserve-answers", args.preserve_answers),
                                              ("--preserve-keys", args.preserve_keys)) if value is not None}
    if given and not args.key_memory:
        raise ValueError(f"{', '.join(given)}: {'shapes' if len(given) == 1 else 'shape'} the key memory; add {needs}")
    sample = [flag for flag in ("--preserve", "--preserve-start", "--preserve-weight", "--preserve-answers", "--preserve-keys") if flag in given]
    if sample and args.preserve_data is None:
        raise ValueError(f"{', '.join(sample)}: the preservation sample needs --preserve-data FILE")
    if sample and args.preserve_data == NO_TEXTS:
        raise ValueError(f"{', '.join(sample)}: shape{'s' if len(sample) == 1 else ''} a preservation sample, which --preserve-data "
                         f"{NO_TEXTS} leaves out")
    records = [flag for flag in ("--preserve", "--preserve-start") if flag in given]
    if records and args.preserve_data == EDITOR_TEXTS:
        raise ValueError(f"{', '.join(records)}: choose{'s' if len(records) == 1 else ''} records of a --preserve-data FILE; "
                         f"--preserve-data {EDITOR_TEXTS} holds every text of the editor's own sample")
    args.past_weight = 1.0 if args.past_weight is None else args.past_weight
    args.preserve = PRESERVE_RECORDS if args.preserve is None else args.preserve
    args.preserve_start = 0 if args.preserve_start is None else args.preserve_start
    args.preserve_weight = PRESERVE_WEIGHT if args.preserve_weight is None else args.preserve_weight
    args.preserve_answers = PRESERVE_ANSWERS[0] if args.preserve_answers is None else args.preserve_answers
    args.preserve_keys = PRESERVE_KEYS[0] if args.preserve_keys is None else args.preserve_keys
    if args.past_weight < 0 or args.preserve_weight <= 0:
        raise ValueError(f"--past-weight must be >= 0 and --preserve-weight > 0, got {args.past_weight} and {args.preserve_weight}")
    if args.preserve < 1 or args.preserve_start < 0:
        raise ValueError(f"--preserve must be >= 1 and --preserve-start >= 0, got {args.preserve} and {args.preserve_start}")


def add_outlier_argument(parser: argparse.ArgumentParser) -> None:
    """``--outlier-factor F|auto|none`` (``editors.base.OutlierEdits``): how far an edit kept after others may move a weight;
    ``outlier_factor_from_arguments`` reads it."""
    from instructedit.editors.base import NEIGHBOUR_OUTLIER_FACTOR, OUTLIER_FACTOR

    parser.add_argument("--outlier-factor", default=None, metavar="F",
                        help=f"--sequential: an edit that would move a weight by more than F times the median change of the edits "
                             f"kept before it (once 8 are) is not kept (default auto: {NEIGHBOUR_OUTLIER_FACTOR:g} with --neighbours, "
                             f"else {OUTLIER_FACTOR:g}; none: every edit is kept)")


def outlier_factor_from_arguments(args: argparse.Namespace) -> float | str | None:
    """``--outlier-factor``'s factor ("auto" unless given; None: ``none``), checked: only with ``--sequential``, a number > 1,
    auto or none."""
    from instructedit.editors.base import AUTO_OUTLIER_FACTOR

    if args.outlier_factor is None:
        return AUTO_OUTLIER_FACTOR
    if not args.sequential:
        raise ValueError("--outlier-factor: refuses edits that would wreck a model edited one edit after another; add --sequential")
    given = args.outlier_factor.strip().lower()
    if given == "none":
        return None
    if given == AUTO_OUTLIER_FACTOR:
        return AUTO_OUTLIER_FACTOR
    try:
        factor = float(args.outlier_factor)
    except ValueError:
        factor = float("nan")
    if not factor > 1 or factor == float("inf"):
        raise ValueError(f"--outlier-factor {args.outlier_factor!r}: a number > 1 (times the median change), auto or none")
    return factor


def add_neighbour_arguments(parser: argparse.ArgumentParser, whose: str) -> None:
    """``--neighbours [N]``, ``--neighbour-weight W``, ``--subjects FILE`` (``editors.neighbours``): the subject of
    ``whose`` edit is swapped for other entities."""
    parser.add_argument("--neighbours", type=int, nargs="?", const=8, default=None, metavar="N",
                        help=f"hold still N questions of each edit's relation (default 8): its question with {whose} subject swapped "
                             "for other entities, asked in its frame, continued with the unedited model's answers; edits are made in "
                             "twice the calibrated rounds (--sequential: two rounds each, the neighbours continued with what the model says as "
                             "the earlier edits left it). Other questions of the relation keep their answers in the frame (held-out "
                             "ZsRE: 82.5 against 18.5 %%), but the subject's other questions and aliases pay on CounterFact "
                             "(results/analysis/in-frame-locality/relation/)")
    parser.add_argument("--neighbour-weight", type=float, default=1000.0, metavar="W",
                        help="--neighbours: their weight in the solve, in tokens per edit (default 1000)")
    parser.add_argument("--subjects", metavar="FILE", default=None,
                        help="--neighbours: the entities swapped in (a text file, one a line, or an edit data file's subjects; "
                             "default: the pool saved with the editor by calibrate)")
    parser.add_argument("--neighbour-seed", type=int, default=0, metavar="S",
                        help="--neighbours: which entities are drawn for each edit (a draw depends on S and the edit's prompt only; "
                             "default 0): another seed, another draw, e.g. to see how much a result depends on it")


def neighbours_from_arguments(args: argparse.Namespace) -> Any:
    """The ``Neighbours`` of ``add_neighbour_arguments`` (None without ``--neighbours``), checked before anything loads;
    refused with ``--key-memory`` without ``--sequential`` (one call's preservation sample: ``apply`` holds one or the
    other)."""
    from instructedit.editors.neighbours import Neighbours, read_subjects

    if args.neighbours is None:
        if args.subjects is not None or args.neighbour_weight != 1000.0 or args.neighbour_seed != 0:
            raise ValueError("--subjects, --neighbour-weight and --neighbour-seed go with --neighbours")
        return None
    if getattr(args, "key_memory", False) and not getattr(args, "sequential", False):  # serve has neither
        raise ValueError("--neighbours build the call's preservation memory: not with --key-memory unless --sequential")
    try:
        return Neighbours(args.neighbours, args.neighbour_weight, read_subjects(args.subjects) if args.subjects else None,
                          args.neighbour_seed)
    except ValueError as e:
        raise ValueError(f"--neighbours: {e}") from None
