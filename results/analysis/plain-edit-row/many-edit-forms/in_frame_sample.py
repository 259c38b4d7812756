"""A lead for in-frame locality: ``in_frame_locality.py``'s measurement, with the editor's preservation sample extended by
the first 400 ZsRE training questions asked in the instruction's frame, continued with what the unedited model says to
them, weighted W (0: the editor's own sample alone). Also the raw locality prompts of held-out records 64..127.
SCALE (default 1): the editor's step sizes × SCALE.

    .venv/bin/python results/analysis/plain-edit-row/many-edit-forms/in_frame_sample.py EDITOR W N [SCALE]
"""
import sys
import instructedit
from instructedit.api import Edit
from instructedit.analysis.many_edits import key_memory
from instructedit.commands.common import load_eval_records
from instructedit.editors.aggregation import KeyMemory
from instructedit.evaluation.generation import answer_budget, bootstrap_ci, exact_match, first_line, greedy_generate, same_answer
from instructedit.models.loading import max_input_length
from instructedit.tasks.collate import Collator
from instructedit.tasks.loaders import load_records
from pathlib import Path

editor = instructedit.load_editor(sys.argv[1]); new_weight = float(sys.argv[2]); n = int(sys.argv[3])
scale = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
model, tok = instructedit.load_model("smollm2-135m-instruct")
mend = editor.editor
own = mend.preservation
train = [r for r in load_records(Path("../shared/data/zsre/zsre_mend_train-1k.json")).records][:400]
texts = [(editor.wrap(Edit(prompt=r.prompt, target=r.target_new, task="zsre")), r.target_new) for r in train]
new = key_memory(mend, model, Collator(tok, max_input_length(model)), texts, 0.0, 1.0, answers="model", keys="all")
combined = KeyMemory(0.0, 1.0)
combined.text = {k: own.text_weight * own.text[k] + new_weight * new.text[k].to(own.text[k].device) for k in own.text}
combined.text_tokens = own.text_tokens + new.text_tokens
mend.set_preservation(combined, f"own x{own.text_weight:g} + 400 wrapped ZsRE-train questions (own answers) x{new_weight:g}")
records, _, _ = load_eval_records("zsre", None, None, "test", 0)
edits = [Edit(prompt=r.prompt, target=r.target_new, task="zsre") for r in records[:n]]
others = [Edit(prompt=r.prompt, target=r.target_new, task="zsre") for r in records[500:524]]
raw = [q for r in records[64:128] for q in r.locality]
forms = ("wrapped", "plain", "chat")
asked = {f: [editor.asked(o, tok)[f] for o in others] for f in forms}
budget = {f: [answer_budget(tok, o.target) for o in others] for f in forms}
def answers(m):
    out = {f: [first_line(a) for a in greedy_generate(m, tok, asked[f], budget[f])] for f in forms}
    out["raw"] = [first_line(a) for a in greedy_generate(m, tok, [q.prompt for q in raw], [answer_budget(tok, q.answer) for q in raw])]
    return out
before = answers(model)
kept = {f: [] for f in (*forms, "raw")}; took = {f: [] for f in forms}; said = {f: [] for f in forms}
from instructedit.editors.base import scaled_step_sizes

for edit in edits:
    with scaled_step_sizes(mend, scale), editor.apply(model, [edit], tok) as edited:
        after = answers(edited.model)
        for f in (*forms, "raw"):
            kept[f].append(sum(same_answer(a, b) for a, b in zip(after[f], before[f])) / len(after[f]))
        for f in forms:
            took[f].append(sum(exact_match(a, edit.target) for a in after[f]) / len(others))
            said[f].append(exact_match(first_line(greedy_generate(edited.model, tok, [editor.asked(edit, tok)[f]], [answer_budget(tok, edit.target)])[0]), edit.target))
r = lambda v: (lambda c: f"{100*c.mean:.1f} [{100*c.low:.1f}, {100*c.high:.1f}]")(bootstrap_ci(v))
print(f"{sys.argv[1]} + wrapped sample x{new_weight:g}, {n} edits" + (f", step sizes x {scale:g}" if scale != 1 else ""))
for f in forms:
    print(f"  {f:<8} said {r(said[f])}; others unchanged {r(kept[f])}; saying target {r(took[f])}")
print(f"  raw locality prompts (records 64..127) unchanged {r(kept['raw'])}")
