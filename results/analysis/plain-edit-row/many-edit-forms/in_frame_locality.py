"""Locality asked in the edit's own frame: after each single edit (rolled back after), the questions of 24 other held-out
ZsRE records asked instruction-wrapped, bare and as a chat turn, as the edit itself is asked. The paper's locality asks raw
(bare) locality prompts only. Per form: the share of other questions whose greedy answer (first line) is unchanged, and
the share that now say the edit's target, each a mean over the edits with a 95 % bootstrap interval over them (n = N).
Edits: held-out ZsRE records 0..N-1; other questions: records 500..523.

    .venv/bin/python results/analysis/plain-edit-row/many-edit-forms/in_frame_locality.py EDITOR_DIR N
"""
import sys

import instructedit
from instructedit.api import Edit
from instructedit.commands.common import load_eval_records
from instructedit.evaluation.generation import answer_budget, bootstrap_ci, exact_match, first_line, greedy_generate, same_answer

editor = instructedit.load_editor(sys.argv[1])
n = int(sys.argv[2])
model, tok = instructedit.load_model("smollm2-135m-instruct")
records, _, _ = load_eval_records("zsre", None, None, "test", 0)
edits = [Edit(prompt=r.prompt, target=r.target_new, task="zsre") for r in records[:n]]
others = [Edit(prompt=r.prompt, target=r.target_new, task="zsre") for r in records[500:524]]
forms = ("wrapped", "plain", "chat")
asked = {f: [editor.asked(o, tok)[f] for o in others] for f in forms}
budget = {f: [answer_budget(tok, o.target) for o in others] for f in forms}


def answers(m):
    return {f: [first_line(a) for a in greedy_generate(m, tok, asked[f], budget[f])] for f in forms}


before = answers(model)
kept, took, said = ({f: [] for f in forms} for _ in range(3))  # per form, per edit
for edit in edits:
    with editor.apply(model, [edit], tok) as edited:
        after = answers(edited.model)
        for f in forms:
            kept[f].append(sum(same_answer(a, b) for a, b in zip(after[f], before[f], strict=True)) / len(others))
            took[f].append(sum(exact_match(a, edit.target) for a in after[f]) / len(others))
            said[f].append(exact_match(first_line(greedy_generate(edited.model, tok, [editor.asked(edit, tok)[f]],
                                                              [answer_budget(tok, edit.target)])[0]), edit.target))


def rate(values):
    ci = bootstrap_ci(values)
    return f"{100 * ci.mean:.1f} [{100 * ci.low:.1f}, {100 * ci.high:.1f}]"


print(f"{sys.argv[1]}: {n} single edits (made in {' + '.join(editor.edit_forms)}, {editor.edit_rounds} round(s)), "
      f"each with {len(others)} other questions per form (generation; 95 % bootstrap intervals over the {n} edits)")
for f in forms:
    print(f"  {f:<8} edit said {rate(said[f])}; other questions unchanged {rate(kept[f])}; "
          f"other questions saying the edit's target {rate(took[f])}")
