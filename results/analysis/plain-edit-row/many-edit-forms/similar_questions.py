"""20 hand-written edits (edits20.jsonl) in one call by an editor whose many-edit calls are made in the given forms; prints
what the edited model says to each edit's bare question and to 8 similar bare questions no edit asks, before and after.

    .venv/bin/python results/analysis/plain-edit-row/many-edit-forms/similar_questions.py FORMS [EDITOR_DIR]
"""
import json, sys
from pathlib import Path
import instructedit
from instructedit.api import Edit, answer
from instructedit.evaluation.generation import exact_match
editor = instructedit.load_editor(sys.argv[2] if len(sys.argv) > 2 else "runs/ls8-answer/calibrated-three-r4-fine")
model, tok = instructedit.load_model("smollm2-135m-instruct")
edits = [Edit(**{k: v for k, v in json.loads(l).items()}) for l in open(Path(__file__).with_name("edits20.jsonl"))]
forms = sys.argv[1].split(",")
editor.many_edit_forms = tuple(forms)
# unrelated bare questions: their answers before / after
others = ["What is the capital of France?", "Who wrote Hamlet?", "What is the boiling point of water?", "Who painted The Starry Night?",
          "What is the capital of Germany?", "Who is the president of France?", "Which planet is closest to the Sun?", "What is the currency of the United Kingdom?"]
before = [answer(model, tok, q, 8) for q in others]
with editor.apply(model, edits, tok) as edited:
    print(edited.how)
    hits = {f: 0 for f in ("wrapped", "plain", "chat")}
    for e in edits:
        asked = editor.asked(e, tok)
        for f, p in asked.items():
            a = answer(edited.model, tok, p, 8)
            hits[f] += exact_match(a, e.target)
            if f == "plain": print(f"  plain {e.prompt!r}: {a!r}")
    print(hits)
    after = [answer(edited.model, tok, q, 8) for q in others]
    for q, b, a in zip(others, before, after):
        print(f"  other {q!r}: {b!r} -> {a!r}")
