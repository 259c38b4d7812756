"""Held-out single edits, each made alone (rolled back after) as the editor makes them, asked in generation:
- said: the edit's question, instruction-wrapped, bare and as a chat turn, answers the target (exact match, first line);
- in-frame locality: the questions of K other held-out records (never edited), asked in each form as the edit is asked,
  keep the answer the unedited model gave; also the share that now say the edit's target;
- locality: the edit's own record's locality prompts (the paper's, raw) keep their answer.
Each rate is a mean over the N edits with a 95 % bootstrap interval over them. Writes OUTPUT (JSON) and prints a summary.

    .venv/bin/python results/analysis/in-frame-locality/measure.py EDITOR --task zsre --edits 50 --output OUT.json
"""
import argparse
import json
import time

import instructedit
from instructedit.api import Edit
from instructedit.commands.common import load_eval_records
from instructedit.evaluation.generation import answer_budget, bootstrap_ci, exact_match, first_line, greedy_generate, same_answer
from instructedit.io import write_json

parser = argparse.ArgumentParser()
parser.add_argument("editor")
parser.add_argument("--task", default="zsre", choices=("zsre", "counterfact"))
parser.add_argument("--edits", type=int, default=50)
parser.add_argument("--others", type=int, default=24)
parser.add_argument("--others-start", type=int, default=None, help="default: 500 (zsre), 110 (counterfact)")
parser.add_argument("--output", required=True)
args = parser.parse_args()
start = args.others_start if args.others_start is not None else {"zsre": 500, "counterfact": 110}[args.task]
if start < args.edits:
    parser.error("the other questions must come from records after the edited ones")
editor = instructedit.load_editor(args.editor)
model, tok = instructedit.load_model("smollm2-135m-instruct")
records, _, _ = load_eval_records(args.task, None, None, "test", 0)
edited = records[: args.edits]
others = [Edit(prompt=r.prompt, target=r.target_new, task=args.task) for r in records[start : start + args.others]]
forms = ("wrapped", "plain", "chat")
asked = {f: [editor.asked(o, tok)[f] for o in others] for f in forms}
# room for each other question's answer and for any edit's target (whether it now says it): the same before and after
budget = [max(answer_budget(tok, t) for t in (o.target, *(r.target_new for r in edited))) for o in others]
t0 = time.time()


def answers(m, prompts, budgets):
    return [first_line(a) for a in greedy_generate(m, tok, prompts, budgets)]


before = {f: answers(model, asked[f], budget) for f in forms}
per_edit = []
for r in edited:
    edit = Edit(prompt=r.prompt, target=r.target_new, task=args.task)
    questions = editor.asked(edit, tok)
    raw = [q.prompt for q in r.locality]
    raw_budget = [answer_budget(tok, q.answer) for q in r.locality]
    raw_before = answers(model, raw, raw_budget) if raw else []
    with editor.apply(model, [edit], tok) as done:
        said = answers(done.model, [questions[f] for f in forms], [answer_budget(tok, r.target_new)] * len(forms))
        row = {"said": {f: exact_match(a, r.target_new) for f, a in zip(forms, said)}, "said_text": dict(zip(forms, said))}
        after = {f: answers(done.model, asked[f], budget) for f in forms}
        row["in_frame_kept"] = {f: sum(map(same_answer, after[f], before[f])) / len(others) for f in forms}
        row["in_frame_target"] = {f: sum(exact_match(a, r.target_new) for a in after[f]) / len(others) for f in forms}
        if raw:
            row["locality"] = sum(map(same_answer, answers(done.model, raw, raw_budget), raw_before)) / len(raw)
    per_edit.append(row)


def rate(values):
    ci = bootstrap_ci(values)
    return {"mean": ci.mean, "low": ci.low, "high": ci.high, "n": len(values)}


summary = {f"{key}_{f}": rate([row[key][f] for row in per_edit]) for key in ("said", "in_frame_kept", "in_frame_target") for f in forms}
summary["locality"] = rate([row["locality"] for row in per_edit if "locality" in row])
write_json(args.output, {"command": "results/analysis/in-frame-locality/measure.py " + " ".join(f"{k}={v}" for k, v in vars(args).items()),
                         "protocol": "generation (greedy, first line, exact match)", "editor": args.editor,
                         "edit_forms": list(editor.edit_forms), "edit_rounds": editor.edit_rounds, "task": args.task,
                         "edits": f"test records 0..{args.edits - 1}", "others": f"test records {start}..{start + args.others - 1}",
                         "seconds": round(time.time() - t0, 1), "summary": summary, "per_edit": per_edit})
show = lambda s: f"{100 * s['mean']:.1f} [{100 * s['low']:.1f}, {100 * s['high']:.1f}]"
print(f"{args.editor} on held-out {args.task}, {args.edits} single edits (generation, 95 % bootstrap intervals over the edits):")
for f in forms:
    print(f"  {f:<8} said {show(summary[f'said_{f}'])}; other questions in this form unchanged {show(summary[f'in_frame_kept_{f}'])}, "
          f"saying the target {show(summary[f'in_frame_target_{f}'])}")
print(f"  locality prompts (the edited records', raw) unchanged {show(summary['locality'])} (n = {summary['locality']['n']} edits)")
