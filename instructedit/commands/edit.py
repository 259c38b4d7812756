"""``instructedit edit``: apply one edit with a trained editor and show the model's predictions before and after."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from instructedit.commands.common import add_editor_arguments
from instructedit.config import DEFAULT_MODEL
from instructedit.records import SENTIMENTS, TASKS


def add_edit_parser(subparsers: Any) -> None:
    """Register ``edit`` on an ``add_subparsers()`` object."""
    edit = subparsers.add_parser(
        "edit", help="apply one edit and show the model's predictions before and after",
        description="Edits the model with a trained editor, prints the top next tokens, a greedy continuation and the "
                    "teacher-forced target accuracy before and after; the model is restored afterwards unless --save.",
    )
    add_editor_arguments(edit)
    edit.add_argument("--prompt", required=True, help="the text the model should continue differently")
    edit.add_argument("--target", required=True, help="the new continuation")
    edit.add_argument("--task", default="counterfact", choices=TASKS, help="which task's instruction wraps the prompt (default: counterfact)")
    edit.add_argument("--subject", default="", help="the entity the edit is about (optional)")
    edit.add_argument("--label", default=None, choices=SENTIMENTS, help="convsent: the sentiment of the target response")
    edit.add_argument("--topic", default=None, help="convsent: the entity the opinion is about (default: --subject)")
    edit.add_argument("--instruction", default="seen", help="'seen' (default), 'unseen', a description index, or 'none'")
    edit.add_argument("--save", metavar="DIR", default=None, help="also write the edited model here (a plain Hugging Face folder)")
    edit.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="length of the greedy continuation (default 20)")
    edit.add_argument("--top-k", type=int, default=5, metavar="K", help="next-token predictions to show (default 5)")
    edit.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    edit.set_defaults(func=run_edit)


def _predictions(pairs: list[tuple[str, float]]) -> list[str]:
    return [f"{json.dumps(token, ensure_ascii=False):<16} {p:.3f}" for token, p in pairs]


def _side_by_side(label: str, before: list[str], after: list[str]) -> list[str]:
    width = max(len(x) for x in [*before, "before"]) + 4
    lines = [f"{label:<24}{'before':<{width}}after"]
    for left, right in zip(before, after):
        lines.append(f"{'':<24}{left:<{width}}{right}")
    return lines


def run_edit(args: argparse.Namespace) -> int:
    from instructedit.api import Edit, answer, generate, load_editor, score_target, top_predictions
    from instructedit.models.loading import load_model, resolve_device

    if args.top_k < 1 or args.max_new_tokens < 1:
        raise ValueError("--top-k and --max-new-tokens must be >= 1")
    if args.save and Path(args.save).exists() and not Path(args.save).is_dir():
        raise ValueError(f"--save {args.save} is an existing file; name a folder for the edited model")
    edit = Edit(prompt=args.prompt, target=args.target, task=args.task, subject=args.subject, label=args.label, topic=args.topic)
    device = resolve_device(args.device)
    editor = load_editor(args.editor, instruction=args.instruction, device=device)
    model_name = args.model or editor.model_name or DEFAULT_MODEL
    model, tok = load_model(model_name, device=device)
    wrapped = editor.wrap(edit)
    _check_fits(model, tok, editor, edit, args)  # before the model runs

    def snapshot(m: Any) -> dict[str, Any]:
        return {"says": json.dumps(answer(m, tok, wrapped, args.max_new_tokens), ensure_ascii=False),
                "says_plain": json.dumps(answer(m, tok, edit.prompt, args.max_new_tokens), ensure_ascii=False),
                "top": _predictions(top_predictions(m, tok, edit.prompt, args.top_k)),
                "text": json.dumps(generate(m, tok, edit.prompt, args.max_new_tokens), ensure_ascii=False),
                "wrapped": score_target(m, tok, wrapped, edit.target), "plain": score_target(m, tok, edit.prompt, edit.target)}

    before = snapshot(model)
    with editor.apply(model, [edit], tok) as edited:
        after = snapshot(edited.model)
        if args.save:
            edited.save_pretrained(args.save)
    instruction = f"description #{editor.instruction} of {edit.task!r}" if editor.instruction is not None else "none"
    lines = [
        f"editor: {args.editor}   model: {model_name}   instruction: {instruction}",
        f"edit [{edit.task}]: {edit.prompt!r} -> {edit.target!r}", "",
        "what the model says (greedy decoding, first line):",
        f"  instruction-wrapped prompt:  {before['says']}  ->  {after['says']}",
        f"  plain prompt:                {before['says_plain']}  ->  {after['says_plain']}", "",
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


def _check_fits(model: Any, tok: Any, editor: Any, edit: Any, args: argparse.Namespace) -> None:
    """The edit input, the prompts with their continuation and --top-k fit the model: ValueError naming the option if not."""
    from instructedit.models.loading import max_input_length

    limit = max_input_length(model)
    editor.edit_batch([edit], tok, limit)  # PromptTooLongError (a ValueError) names the length and the limit
    for what, text in (("--prompt", edit.prompt), ("--prompt with the task instruction", editor.wrap(edit))):
        n = len(tok(text)["input_ids"])
        if n + args.max_new_tokens > limit:
            raise ValueError(f"{what} is {n} tokens; with --max-new-tokens {args.max_new_tokens} this model accepts "
                             f"at most {limit - args.max_new_tokens}: shorten the prompt or lower --max-new-tokens")
    vocab = model.get_output_embeddings().weight.shape[0]
    if args.top_k > vocab:
        raise ValueError(f"--top-k {args.top_k} is more than the model's vocabulary ({vocab} tokens)")
