"""Held-out ZsRE edits kept one on top of another as ``instructedit serve`` keeps them: each a single edit
(``apply([edit])``: the editor's calibrated rounds and step sizes), made on the model the earlier ones left, in FORMS
("as-calibrated": the editor's edit forms). After each count in CHECKS: the share of the edits so far said in each form
and of 192 other held-out ZsRE locality prompts (records 64..255) whose greedy answer is unchanged (generation).

    .venv/bin/python results/analysis/plain-edit-row/many-edit-forms/stacked_edits.py EDITOR_DIR FORMS|as-calibrated CHECKS
"""
import sys

import instructedit
from instructedit.api import Edit
from instructedit.commands.common import load_eval_records
from instructedit.evaluation.generation import answer_budget, exact_match, first_line, greedy_generate, same_answer

editor_dir, forms, checks = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
editor = instructedit.load_editor(editor_dir)
model, tok = instructedit.load_model("smollm2-135m-instruct")
records, _, _ = load_eval_records("zsre", None, None, "test", 0)
edits = [Edit(prompt=r.prompt, target=r.target_new, task="zsre") for r in records[: max(checks)]]
others = [q for r in records[64:256] for q in r.locality]
prompts, budgets = [q.prompt for q in others], [answer_budget(tok, q.answer) for q in others]
before = [first_line(a) for a in greedy_generate(model, tok, prompts, budgets)]
made = None if forms == "as-calibrated" else forms.split(",")
print(f"{editor_dir}, each edit made in {' + '.join(made or editor.edit_forms)}")
handles = []
try:
    for i, edit in enumerate(edits):
        handles.append(editor.apply(model, [edit], tok, forms=made))
        if i + 1 in checks:
            after = [first_line(a) for a in greedy_generate(model, tok, prompts, budgets)]
            kept = sum(same_answer(a, b) for a, b in zip(after, before, strict=True)) / len(prompts)
            said = {}
            for form in ("wrapped", "plain", "chat"):
                asked = [editor.asked(e, tok)[form] for e in edits[: i + 1]]
                got = greedy_generate(model, tok, asked, [answer_budget(tok, e.target) for e in edits[: i + 1]])
                said[form] = sum(exact_match(first_line(g), e.target) for g, e in zip(got, edits)) / (i + 1)
            print(f"  {i + 1} kept edits: said wrapped {said['wrapped']:.3f}, bare {said['plain']:.3f}, chat {said['chat']:.3f} "
                  f"(n={i + 1}); other answers kept {kept:.3f} (n={len(prompts)})", flush=True)
finally:
    for handle in reversed(handles):
        handle.rollback()
