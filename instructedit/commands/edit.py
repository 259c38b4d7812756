"""``instructedit edit``: apply one edit (or a JSONL file of edits) with a trained editor and show the model's answers before and after."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from instructedit.commands.common import (
    EDITOR_TEXTS, NO_TEXTS, add_answer_stop_argument, add_dtype_argument, add_editor_arguments, add_key_memory_arguments, add_neighbour_arguments,
    add_outlier_argument, add_rounds_arguments, aggregation, check_key_memory_arguments, key_memory_by_default,
    key_memory_from_arguments, load_editor_and_model, neighbours_from_arguments, outlier_factor_from_arguments,
)
from instructedit.records import SENTIMENTS, TASKS

logger = logging.getLogger(__name__)

EDIT_KEYS = ("prompt", "target", "task", "subject", "rephrase", "label", "topic")  # a line of an --file edits.jsonl

# what ``edit`` says about the stop the edit's answers are made with (config.ANSWER_STOPS)
STOP_WORDS = {"none": "no stop after the answer", "newline": "each answer ending with a newline", "eos": "each answer ending with EOS",
              "newline+turn": "the wrapped and bare answers ending with a newline, the chat answer with the end of the turn",
              "newline+end": "the wrapped and bare answers ending with a newline and EOS, the chat answer with the end of the turn"}


def _loaded(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    """(editor, model, tokenizer, model name) as the arguments ask (``load_editor_and_model``)."""
    from instructedit.models.loading import resolve_device

    return load_editor_and_model(args.editor, args.model, args.instruction, resolve_device(args.device), args.dtype, args.answer_stop)


def add_edit_parser(subparsers: Any) -> None:
    """Register ``edit`` on an ``add_subparsers()`` object."""
    edit = subparsers.add_parser(
        "edit", help="apply one edit (or many, --file) and show the model's predictions before and after",
        description="Edits the model with a trained editor, prints the top next tokens, a greedy continuation and the "
                    "teacher-forced target accuracy before and after; with --file, many edits (one JSON object a line: "
                    "prompt, target, optional task, subject, rephrase) in one call or --sequential, and a table of the "
                    "greedy answers before and after. The model is restored afterwards; --save writes the edited one.",
    )
    add_editor_arguments(edit)
    which = edit.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="the text the model should continue differently")
    which.add_argument("--file", metavar="EDITS.jsonl", help="many edits, one JSON object a line: prompt, target, optional task, subject, rephrase (or paraphrase)")
    edit.add_argument("--target", help="the new continuation (with --prompt)")
    edit.add_argument("--sequential", action="store_true", help="--file: apply the edits one after another, not in one call")
    add_rounds_arguments(edit, "--file in one call, or each --sequential edit (there auto is 1, 2 with --neighbours, "
                        "4 with a key memory holding a preservation sample, as --neighbours makes by default)", "auto")
    add_key_memory_arguments(edit, "--sequential: each edit's solve",
                             also="; a --file in one call (with --preserve-data and --rounds K): the call's solves hold the "
                                  "sample still instead of the editor's own (hundreds of edits keep more unrelated answers)",
                             with_neighbours=True)
    edit.add_argument("--task", default="counterfact", choices=TASKS,
                      help="which task's instruction wraps the prompt (default: counterfact; --file: for lines without a task)")
    edit.add_argument("--subject", default="", help="the entity the edit is about (optional)")
    edit.add_argument("--label", default=None, choices=SENTIMENTS, help="convsent: the sentiment of the target response")
    edit.add_argument("--topic", default=None, help="convsent: the entity the opinion is about (default: --subject)")
    edit.add_argument("--instruction", default="seen", help="'seen' (default), 'unseen', a description index, or 'none'")
    add_answer_stop_argument(edit)
    edit.add_argument("--save", metavar="DIR", default=None, help="also write the edited model here (a plain Hugging Face folder)")
    edit.add_argument("--output", metavar="FILE.jsonl", default=None,
                      help="--file: also write one JSON line per edit with its answers before and after in full, whether each "
                           "is the target (generation protocol) and its target-token accuracy (teacher-forced)")
    edit.add_argument("--ask", action="append", default=[], metavar="QUESTION",
                      help="another question to ask before and after the edit(s), repeatable: as it is, in the edit's instruction "
                           "frame and as a chat turn (where the model has a chat template), each answer marked when the edit left "
                           "it alone or it now says an edit's target; other questions asked in the frame are where edits leak most "
                           "(results/analysis/in-frame-locality/)")
    add_neighbour_arguments(edit, "the edit's (--subject; --file: each line's)")
    add_outlier_argument(edit)
    edit.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="length of the greedy continuation (default 20)")
    edit.add_argument("--top-k", type=int, default=5, metavar="K", help="next-token predictions to show (default 5)")
    edit.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    add_dtype_argument(edit)
    edit.set_defaults(func=run_edit)


def _predictions(pairs: list[tuple[str, float]]) -> list[str]:
    return [f"{json.dumps(token, ensure_ascii=False):<16} {p:.3f}" for token, p in pairs]


def _side_by_side(label: str, before: list[str], after: list[str]) -> list[str]:
    width = max(len(x) for x in [*before, "before"]) + 4
    lines = [f"{label:<24}{'before':<{width}}after"]
    for left, right in zip(before, after):
        lines.append(f"{'':<24}{left:<{width}}{right}")
    return lines


def _check_file_arguments(args: argparse.Namespace) -> None:
    """``edit --file``'s options checked (a single edit's refused; rounds, sample weight and key memory as the call is made:
    in one call or ``--sequential``) and completed, before anything loads."""
    single = [flag for flag, value in (("--target", args.target), ("--subject", args.subject or None), ("--label", args.label),
                                       ("--topic", args.topic)) if value is not None]
    if single:
        raise ValueError(f"{', '.join(single)}: for a single --prompt edit only; with --file put them on the file's lines")
    if isinstance(args.rounds, int) and args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds}: rounds are >= 1, or auto")
    key_memory_by_default(args, args.sequential)
    if args.sample_weight is not None and (args.sequential or not args.sample_weight > 0):
        raise ValueError(f"--sample-weight {args.sample_weight:g}: a positive weight of the editor's preservation sample in the "
                         "one call that makes the edits of a --file, not --sequential")
    if args.key_memory and not args.sequential:  # one call: the memory is a preservation sample its solves hold still
        if args.preserve_data in (None, NO_TEXTS):
            raise ValueError("--key-memory holds earlier edits still while edits are kept one after another: add --sequential; "
                             "or, in one call, a preservation sample: add --preserve-data FILE and --rounds K")
        if args.past_weight is not None:
            raise ValueError("--past-weight: earlier edits' keys, for --sequential; one call holds only the --preserve-data sample")
        if args.rounds == "auto":
            raise ValueError("--key-memory in one call: give --rounds K (auto is fitted to the editor's own sample; measured: "
                             "256 edits, --rounds 32 --preserve-weight 128000, results/analysis/edit-rounds/blocks/)")
        if args.sample_weight is not None:
            raise ValueError("--sample-weight weighs the editor's own sample, which --key-memory's replaces: give --preserve-weight")
        check_key_memory_arguments(args)
        args.past_weight = 0.0
    else:
        check_key_memory_arguments(args, needs="--key-memory --sequential", sequential=args.sequential)


def _neighbours(args: argparse.Namespace) -> Any:
    """``--neighbours``' ``Neighbours`` (None without it), checked before anything loads."""
    from instructedit.editors.neighbours import names_subject

    neighbours = neighbours_from_arguments(args)
    if neighbours is not None and args.file is None:
        if not args.subject:
            raise ValueError("--neighbours swaps the edit's subject for other entities: give --subject (named in --prompt)")
        if not names_subject(args.prompt, args.subject):
            raise ValueError(f"--neighbours: --subject {args.subject!r} does not occur in --prompt; the neighbours swap it there")
    return neighbours


def run_edit(args: argparse.Namespace) -> int:
    from instructedit.api import Edit, answer, check_save_folder, generate, score_target, top_predictions
    from instructedit.evaluation.generation import shown
    from instructedit.models.loading import max_input_length

    from instructedit.editors.neighbours import names_subject

    if args.top_k < 1 or args.max_new_tokens < 1:
        raise ValueError("--top-k and --max-new-tokens must be >= 1")
    neighbours = _neighbours(args)
    args.outlier_factor = outlier_factor_from_arguments(args)
    if args.save:  # before the model loads: where the edited model goes must be free for it
        try:
            check_save_folder(args.save)
        except ValueError as e:
            raise ValueError(f"--save {e}") from None
    if args.file is not None:
        _check_file_arguments(args)
        numbered = read_edits(args.file, args.task)  # a bad line fails before the model loads
        unnamed = [n for n, e in numbered if not names_subject(e.prompt, e.subject)] if neighbours is not None else []
        if unnamed:
            raise ValueError(f"--neighbours swaps each edit's subject in its prompt: {args.file} line(s) "
                             f"{', '.join(map(str, unnamed[:10]))} have no subject their prompt names")
        if args.output and Path(args.output).is_dir():
            raise ValueError(f"--output {args.output} is a folder; name the JSON Lines file to write")
        editor, model, tok, model_name = _loaded(args)
        if args.sample_weight is not None and getattr(editor.editor, "preservation", None) is None:
            raise ValueError(f"--sample-weight: {args.editor} has no preservation sample of its own (instructedit calibrate --preserve "
                             "saves one)")
        return _edit_many(args, numbered, editor, model, tok, model_name, neighbours)
    if args.target is None:
        raise ValueError("--prompt needs --target, the new continuation")
    if args.output:
        raise ValueError("--output writes the answers of the many edits of a --file; a single --prompt edit prints all of its own")
    if args.sequential:
        raise ValueError("--sequential applies the edits of a --file one after another; a single --prompt edit has no order")
    if args.rounds not in (1, "auto") or args.sample_weight is not None:
        raise ValueError("--rounds and --sample-weight: for the many edits of a --file made in one call")
    if args.key_memory:
        raise ValueError("--key-memory holds earlier edits still while editing a --file one after another; a single --prompt edit has none")
    check_key_memory_arguments(args, needs="--file EDITS.jsonl --sequential --key-memory")
    edit = Edit(prompt=args.prompt, target=args.target, task=args.task, subject=args.subject, label=args.label, topic=args.topic)
    editor, model, tok, model_name = _loaded(args)
    asked = editor.asked(edit, tok)  # wrapped, plain and (a chat template) the question as a chat user turn
    wrapped, chat = asked["wrapped"], asked.get("chat")
    _check_fits(model, tok, editor, [edit], ["--prompt"], args)  # before the model runs
    others = _ask_forms(editor, tok, [edit], args.ask, max_input_length(model), args.max_new_tokens)
    vocab = model.get_output_embeddings().weight.shape[0]
    if args.top_k > vocab:
        raise ValueError(f"--top-k {args.top_k} is more than the model's vocabulary ({vocab} tokens)")

    def snapshot(m: Any) -> dict[str, Any]:
        return {"says": shown(answer(m, tok, wrapped, args.max_new_tokens)),
                "says_plain": shown(answer(m, tok, edit.prompt, args.max_new_tokens)),
                "says_chat": shown(answer(m, tok, chat, args.max_new_tokens)) if chat else "",
                "top": _predictions(top_predictions(m, tok, wrapped, args.top_k)),  # where the edit is made
                "text": shown(generate(m, tok, edit.prompt, args.max_new_tokens)),
                "wrapped": score_target(m, tok, wrapped, edit.target), "plain": score_target(m, tok, edit.prompt, edit.target),
                "asked": _ask_answers(m, tok, others, args.max_new_tokens)}

    before = snapshot(model)
    with editor.apply(model, [edit], tok, neighbours=neighbours) as edited:
        after = snapshot(edited.model)
        if args.save:
            edited.save_pretrained(args.save)
    instruction = f"description #{editor.instruction} of {edit.task!r}" if editor.instruction is not None else "none"
    made = [f"made in the forms {' + '.join(editor.edit_forms)}, solved together; {STOP_WORDS[editor.answer_stop]}"] \
        if editor.edit_forms != ("wrapped",) else []
    asked_rounds = edited.how["rounds"]
    made += [f"made in {edited.rounds_made} rounds" + (", as calibrated" if neighbours is None else "") if edited.rounds_made == asked_rounds
             else f"made in {edited.rounds_made} of {asked_rounds} rounds (the next raised the edit's loss)"] \
        if asked_rounds != 1 else []
    made += [f"holding {neighbours.count} same-relation neighbours still at {neighbours.weight:g} tokens"] if neighbours else []
    lines = [
        f"editor: {args.editor}   model: {model_name}   instruction: {instruction}",
        f"edit [{edit.task}]: {edit.prompt!r} -> {edit.target!r}" + (f"   ({'; '.join(made)})" if made else ""), "",
        "what the model says (greedy decoding, first line):",
        f"  instruction-wrapped prompt:  {before['says']}  ->  {after['says']}",
        f"  plain prompt:                {before['says_plain']}  ->  {after['says_plain']}",
        *([f"  chat question (user turn):   {before['says_chat']}  ->  {after['says_chat']}"] if chat else []), "",
        *(_asked_lines(args.ask, others, before["asked"], after["asked"], [("the edit's target", edit.target)]) if others else []),
        "next tokens after the instruction-wrapped prompt (the edit's own):",
        *_side_by_side(f"top-{args.top_k} next tokens", before["top"], after["top"]), "",
        "greedy continuation of the plain prompt:", f"  before: {before['text']}", f"  after:  {after['text']}", "",
        "target accuracy (teacher-forced token accuracy of the target):",
        f"  instruction-wrapped prompt (reliability): {before['wrapped'].accuracy:.2f} -> {after['wrapped'].accuracy:.2f}"
        f"   p(target) {before['wrapped'].probability:.4f} -> {after['wrapped'].probability:.4f}",
        f"  plain prompt:                             {before['plain'].accuracy:.2f} -> {after['plain'].accuracy:.2f}"
        f"   p(target) {before['plain'].probability:.4f} -> {after['plain'].probability:.4f}",
    ]
    if args.save:
        lines.append(f"\nsaved the edited model to {Path(args.save)} (load it with AutoModelForCausalLM.from_pretrained)")
    lines.append("the in-memory model was restored after the edit")
    print("\n".join(lines))
    return 0


def read_edits(path: str | Path, task: str) -> list[tuple[int, Any]]:
    """The ``Edit`` of each line of a JSONL file, with its line number (``task`` for lines that name none).

    One JSON object a line with ``prompt`` and ``target`` and optionally ``task``, ``subject``,
    ``rephrase`` (a string or a list of strings), and ``label`` / ``topic`` for ConvSent; blank lines
    are skipped. A bad line raises ValueError naming the file and the line; keys outside these are
    reported in a warning (file, keys, lines) and not used.
    """
    from instructedit.api import REPHRASE_ALIAS, Edit, rephrase_key

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--file {path} does not exist")
    edits: list[tuple[int, Any]] = []
    unknown: dict[str, list[int]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg}); each line is one object such as "
                             '{"prompt": "The Eiffel Tower is in", "target": "Rome"}') from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: a JSON {type(row).__name__}, expected an object with prompt and target")
        try:
            key = rephrase_key(row)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        row = {k: v for k, v in row.items() if k not in ("rephrase", REPHRASE_ALIAS)} | ({"rephrase": row[key]} if key else {})
        missing = [k for k in ("prompt", "target") if k not in row]
        rephrase = [row["rephrase"]] if isinstance(row.get("rephrase"), str) else row.get("rephrase") or []
        wrong = [k for k in EDIT_KEYS if row.get(k) is not None and k != "rephrase" and not isinstance(row[k], str)]
        if not isinstance(rephrase, list) or not all(isinstance(r, str) for r in rephrase):
            wrong.append("rephrase")
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + \
                   ([f"{', '.join(wrong)} must be text (rephrase: text or a list of texts)"] if wrong else [])
        if problems:
            raise ValueError(f"{where}: {'; '.join(problems)}")
        for key in sorted(row.keys() - set(EDIT_KEYS)):
            unknown.setdefault(key, []).append(number)
        try:
            edits.append((number, Edit(prompt=row["prompt"], target=row["target"], task=row.get("task") or task, subject=row.get("subject") or "",
                                       rephrase=tuple(rephrase), label=row.get("label"), topic=row.get("topic"))))
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    if unknown:
        logger.warning("%s: unknown key(s) not used: %s; a line's keys are %s", path,
                       "; ".join(f"{k!r} (line {', '.join(map(str, n[:5]))}{', ...' if len(n) > 5 else ''})" for k, n in unknown.items()),
                       ", ".join(EDIT_KEYS))
    if not edits:
        raise ValueError(f"--file {path} holds no edits; write one JSON object a line with prompt and target")
    return edits


ANSWER_WIDTH = 22  # the answer columns of edit --file's table; --output writes the answers in full


def _cell(text: str, width: int) -> str:
    from instructedit.evaluation.generation import shown

    text = shown(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _edit_many(args: argparse.Namespace, numbered: list[tuple[int, Any]], editor: Any, model: Any, tok: Any, model_name: str,
               neighbours: Any = None) -> int:
    """``edit --file``: all edits in one call (the editor's aggregation) or --sequential; a table of answers before and after."""
    from instructedit.api import answer, score_target
    from instructedit.evaluation.generation import exact_match, shown
    from instructedit.io import atomic_write
    from instructedit.models.loading import max_input_length

    edits = [e for _, e in numbered]
    _check_fits(model, tok, editor, edits, [f"{args.file} line {n}" for n, _ in numbered], args)
    # each edit is asked instruction-wrapped (its row names the edit) and in the other forms the editor makes it in: an
    # editor made for the bare question and the chat turn is read there too
    forms = ["wrapped", *(f for f in editor.edit_forms if f != "wrapped")]
    asked = [editor.asked(e, tok) for e in edits]
    wrapped = [prompts["wrapped"] for prompts in asked]

    def snapshot(m: Any) -> list[tuple[dict[str, str], float]]:  # per edit: greedy answer per form, target-token accuracy (wrapped)
        return [({f: answer(m, tok, prompts[f], args.max_new_tokens) for f in forms}, score_target(m, tok, w, e.target).accuracy)
                for prompts, w, e in zip(asked, wrapped, edits)]

    others = _ask_forms(editor, tok, edits, args.ask, max_input_length(model), args.max_new_tokens)
    before, asked_before = snapshot(model), _ask_answers(model, tok, others, args.max_new_tokens)
    memory, kept, n_texts = None, "", 0
    where = "the editor's own sample" if args.preserve_data == EDITOR_TEXTS else args.preserve_data  # the memory's sample
    if args.key_memory:
        memory, n_texts = key_memory_from_arguments(args, editor.editor_for(model, tok), model, tok)
        said = "the model's answers" if args.preserve_answers == "model" else "the data's answers" if args.preserve_answers == "data" else \
            "the data's and the model's answers"
        notes = [f"{n_texts} preserved texts of {where} continued with {said} at {memory.text_weight:g} tokens"] if n_texts else []
        if args.key_memory_default:
            notes.append("the default with --neighbours, --no-key-memory leaves it out")
        elif args.sample_default and n_texts:
            notes.append("the default with --neighbours, --preserve-data FILE another")
        kept = ", with a key memory" + (f" ({'; '.join(notes)})" if notes else "")
    with (editor.apply_sequential(model, edits, tok, memory=memory, neighbours=neighbours, rounds=args.rounds,
                                  outlier_factor=args.outlier_factor) if args.sequential
          else editor.apply(model, edits, tok, rounds=args.rounds, sample_weight=args.sample_weight, progress=True, memory=memory,
                            neighbours=neighbours)) as edited:
        after, asked_after = snapshot(edited.model), _ask_answers(edited.model, tok, others, args.max_new_tokens)
        if args.save:
            edited.save_pretrained(args.save)
    # how the call was made (``apply``'s schedule: rounds, the sample's weight, the step sizes' multiplier)
    n_rounds, made = (edited.how["rounds"],) * 2 if args.sequential else (edited.how["rounds"], edited.rounds_made)
    weight = None if args.sequential or isinstance(edited.how["sample_weight"], str) else edited.how["sample_weight"]
    scale = edited.how["step_scale"]
    scaled = f", step sizes x {scale:g} (the editor's many-edit multiplier)" if scale != 1.0 else ""
    rounds = "" if n_rounds == 1 else f", {n_rounds} rounds" if made == n_rounds else \
        f", {made} of {n_rounds} rounds (round {made + 1} raised the edits' loss and was undone)"
    if memory is not None and not args.sequential:
        rounds += f", holding {n_texts} preserved texts of {where} still, weighted {memory.text_weight:g} (--key-memory)"
    elif neighbours is not None:
        rounds += f", holding {neighbours.count} same-relation neighbours per edit still at {neighbours.weight:g} tokens (--neighbours)"
    elif weight is not None:
        rounds += f", preservation sample weighted {weight:g} (calibrated {editor.editor.preservation.text_weight:g})"
    rounds += scaled
    if args.rounds == "auto" and (n_rounds != 1 or weight is not None or scaled):
        rounds += ": --rounds auto"
    refused = edited.how.get("refused", []) if args.sequential else []
    if refused:  # lines whose update would have wrecked the model (editors/base.py OutlierEdits): not kept, each warned about
        kept += f"; {len(refused)} not kept (line(s) {', '.join(str(numbered[i][0]) for i in refused)}: each update would have wrecked the model)"
    if args.sequential:
        kept += scaled
        kept += f", each edit in {n_rounds} rounds" if n_rounds != 1 else ""
        if neighbours is not None:
            kept += f", each holding {neighbours.count} same-relation neighbours still at {neighbours.weight:g} tokens (--neighbours)"
        from instructedit.editors.base import AUTO_OUTLIER_FACTOR, OUTLIER_FACTOR

        factor = edited.how["outlier_factor"]
        if factor != OUTLIER_FACTOR:
            kept += (", every edit kept (--outlier-factor none)" if factor is None else
                     f", an edit moving a weight more than {factor:g}x the median change not kept (--outlier-factor"
                     f"{' auto' if args.outlier_factor == AUTO_OUTLIER_FACTOR else ''})")
    how = f"one after another (--sequential{kept})" if args.sequential else f"in one call (aggregation {aggregation(editor.editor)}{rounds})"
    instruction = f"description #{editor.instruction} of each edit's task" if editor.instruction is not None else "none"
    several = len(forms) > 1
    made_in = f"the editor makes its edits in {' + '.join(editor.edit_forms)}"
    if edited.how["edit_forms"] != list(editor.edit_forms):  # many edits: its many_edit_forms
        made_in = f"made in {' + '.join(edited.how['edit_forms'])}: {made_in}, many edits without the bare question"
    form_cell = (lambda f: f"  {f:<7}") if several else (lambda f: "")
    lines = [f"editor: {args.editor}   model: {model_name}   instruction: {instruction}",
             f"{len(edits)} edits from {args.file}, applied {how}"
             + (f"; each asked in the forms {' + '.join(forms)} ({made_in})" if several else ""), "",
             f"{'line':>5}  {'prompt':<40}  {'target':<18}{form_cell('form')}  {'answer before':<{ANSWER_WIDTH}}  {'answer after':<{ANSWER_WIDTH}}  accuracy"]
    for (number, e), (says, acc), (says_after, acc_after) in zip(numbered, before, after):
        for k, f in enumerate(forms):  # the wrapped form's row names the edit and carries its teacher-forced accuracy
            head = f"{number:>5}  {_cell(e.prompt, 40):<40}  {_cell(e.target, 18):<18}" if k == 0 else " " * 67
            lines.append((f"{head}{form_cell(f)}  {_cell(says[f], ANSWER_WIDTH):<{ANSWER_WIDTH}}  {_cell(says_after[f], ANSWER_WIDTH):<{ANSWER_WIDTH}}"
                          + (f"  {acc:.2f} -> {acc_after:.2f}" if k == 0 else "")).rstrip())
    hits = {f: [sum(exact_match(says[f], e.target) for (says, _), e in zip(side, edits)) for side in (before, after)] for f in forms}
    mean = [sum(acc for _, acc in side) / len(edits) for side in (before, after)]
    said = "; ".join(f"{f + ' ' if several else ''}{h[0]:.0f}/{len(edits)} before -> {h[1]:.0f}/{len(edits)} after" for f, h in hits.items())
    lines += ["", f"totals: {len(edits)} edits; answer is the target {said}; mean target-token accuracy {mean[0]:.2f} -> {mean[1]:.2f}"]
    if others:
        lines += ["", *_asked_lines(args.ask, others, asked_before, asked_after, [(f"line {n}'s target", e.target) for n, e in numbered],
                                  "the edits")]
    if args.output:
        rows = [{"line": number, "task": e.task, "prompt": e.prompt, "target": e.target,
                 "said_before": says["wrapped"], "said_after": says_after["wrapped"],  # the greedy answers' first lines, in full
                 "said_target_before": exact_match(says["wrapped"], e.target), "said_target_after": exact_match(says_after["wrapped"], e.target),
                 "accuracy_before": acc, "accuracy_after": acc_after,
                 "forms": {f: {"prompt": prompts[f], "said_before": says[f], "said_after": says_after[f],
                               "said_target_before": exact_match(says[f], e.target), "said_target_after": exact_match(says_after[f], e.target)}
                           for f in forms},
                 "protocols": {"said_target": "generation", "accuracy": "teacher_forced"}}
                for (number, e), prompts, (says, acc), (says_after, acc_after) in zip(numbered, asked, before, after)]
        atomic_write(args.output, lambda tmp: Path(tmp).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)))
        lines.append(f"wrote every answer in full to {args.output}")
    elif any(len(shown(text)) > ANSWER_WIDTH for side in (before, after) for says, _ in side for text in says.values()):
        lines.append("(answers longer than their column are cut: --output FILE.jsonl writes them in full)")
    if args.save:
        lines.append(f"\nsaved the edited model to {Path(args.save)} (load it with AutoModelForCausalLM.from_pretrained)")
    lines.append("the in-memory model was restored after the edits")
    print("\n".join(lines))
    return 0


def _ask_forms(editor: Any, tok: Any, edits: list[Any], questions: list[str], limit: int, max_new_tokens: int) -> list[dict[str, str]]:
    """Each ``--ask`` question in the forms it is asked: as it is, in the instruction frame of each task the ``edits`` are
    made for, and as a chat user turn (a chat template). A question that does not fit the model with its answer is an error
    naming it."""
    from instructedit.tasks.collate import chat_query

    tasks = list(dict.fromkeys(e.task for e in edits))
    frames = {e.task: e for e in edits}  # one edit per task: its frame is the task's instruction
    asked = []
    for question in questions:
        if not question.strip():
            raise ValueError("--ask: an empty question")
        forms = {"as it is": question}
        for task in tasks:
            forms["in the edit's frame" if len(tasks) == 1 else f"in the {task} frame"] = editor.wrap(frames[task], question)
        chat = chat_query(tok, question)
        forms |= {"chat question": chat} if chat is not None else {}
        for form, text in forms.items():
            _check_room(tok, text, f"--ask {question[:40]!r} {form}", max_new_tokens, limit)
        asked.append(forms)
    return asked


def _ask_answers(model: Any, tok: Any, asked: list[dict[str, str]], max_new_tokens: int) -> list[dict[str, str]]:
    """What ``model`` says to each ``--ask`` question in each of its forms (``_ask_forms``): greedy, the first line."""
    from instructedit.api import answer

    return [{form: answer(model, tok, text, max_new_tokens) for form, text in forms.items()} for forms in asked]


def _asked_lines(questions: list[str], asked: list[dict[str, str]], before: list[dict[str, str]], after: list[dict[str, str]],
                 targets: list[tuple[str, str]], who: str = "the edit") -> list[str]:
    """The ``--ask`` block: per question and form, the answer before -> after (greedy, first line), "(as before)" where the
    edit left it alone, and which edit's target it now says (``targets``: (name, target) per edit)."""
    from instructedit.evaluation.generation import exact_match, same_answer, shown, shown_change

    width = max(len(form) for forms in asked for form in forms) + 1
    lines = ["other questions (--ask), what the model says before -> after (greedy decoding, first line):"]
    for question, forms, says, says_after in zip(questions, asked, before, after):
        lines.append(f"  {shown(question)}")
        for form in forms:
            hit = [name for name, target in targets if exact_match(says_after[form], target)]
            mark = f"   (says {' and '.join(hit)})" if hit else ""
            lines.append(f"    {form + ':':<{width}}  {shown_change(says[form], says_after[form])}{mark}")
    kept = sum(same_answer(a[f], b[f]) for forms, b, a in zip(asked, before, after) for f in forms)
    total = sum(len(forms) for forms in asked)
    return [*lines, f"  answers {who} left alone: {kept} of {total} (generation locality)", ""]


def _check_fits(model: Any, tok: Any, editor: Any, edits: list[Any], names: list[str], args: argparse.Namespace) -> None:
    """The edit inputs and each prompt with its continuation fit the model: ValueError naming the option or line if not."""
    from instructedit.models.loading import max_input_length

    limit = max_input_length(model)
    editor.edit_batch(edits, tok, limit)  # PromptTooLongError (a ValueError) names the length and the limit
    for edit, name in zip(edits, names):
        for what, text in ((name, edit.prompt), (f"{name} with the task instruction", editor.wrap(edit))):
            _check_room(tok, text, what, args.max_new_tokens, limit)


def _check_room(tok: Any, text: str, what: str, max_new_tokens: int, limit: int) -> None:
    """``text`` with a ``max_new_tokens`` answer fits a model of ``limit`` tokens: ValueError naming ``what`` if not."""
    n = len(tok(text)["input_ids"])
    if n + max_new_tokens > limit:
        raise ValueError(f"{what} is {n} tokens; with --max-new-tokens {max_new_tokens} this model accepts "
                         f"at most {limit - max_new_tokens}: shorten the prompt or lower --max-new-tokens")
