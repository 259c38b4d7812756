"""Single edits made in 1 or 2 rounds, at multipliers of the editor's step sizes, on ZsRE's training questions (not the
held-out file): said (the wrapped prompt's greedy first line is the target, exact match) and kept (the locality
question's greedy first line is the unedited model's). Generation protocol, 95 % bootstrap intervals over the records.
results/analysis/edit-rounds/README.md."""
import argparse, json, sys, time
from pathlib import Path
import torch
from instructedit.api import Edit, generate, load_editor
from instructedit.evaluation.generation import bootstrap_ci, exact_match, first_line, answer_budget, same_answer
from instructedit.evaluation.generation_check import scaled_step_sizes
from instructedit.models.loading import load_model
from instructedit.tasks.loaders import load_records

p = argparse.ArgumentParser()
p.add_argument("--editor", default="runs/ls8-answer/calibrated")
p.add_argument("--data", default="../shared/data/zsre/zsre_mend_train-1k.json")
p.add_argument("--start", type=int, default=0)
p.add_argument("--n", type=int, default=100)
p.add_argument("--grid", default="1:1,2:1,2:0.667")  # rounds:relative multiplier
p.add_argument("--output", required=True)
a = p.parse_args()
torch.manual_seed(0)
model, tok = load_model("smollm2-135m-instruct")
ed = load_editor(a.editor)
records = [r for r in load_records(Path(a.data)).records if r.locality][a.start:a.start + a.n]
inner = ed.editor_for(model, tok)
before = [first_line(generate(model, tok, r.locality[0].prompt, answer_budget(tok, r.locality[0].answer))) for r in records]
out = {"command": " ".join(sys.argv), "editor": a.editor, "data": a.data, "n": len(records), "protocol": "generation", "runs": {}}
for cell in a.grid.split(","):
    rounds, rel = int(cell.split(":")[0]), float(cell.split(":")[1])
    said, kept, rows, t0 = [], [], [], time.time()
    with scaled_step_sizes(inner, rel):
        for r, b in zip(records, before):
            e = Edit(prompt=r.prompt, target=r.target_new, task="zsre")
            with ed.apply(model, e, tok, rounds=rounds) as em:
                ans = first_line(em.generate(ed.wrap(e), answer_budget(tok, r.target_new)))
                loc = first_line(em.generate(r.locality[0].prompt, answer_budget(tok, r.locality[0].answer)))
                made = em.rounds_made
            said.append(float(exact_match(ans, r.target_new))); kept.append(float(same_answer(loc, b)))
            rows.append({"target": r.target_new, "answer": ans, "loc_before": b, "loc_after": loc, "rounds_made": made})
    out["runs"][cell] = {"rounds": rounds, "relative_multiplier": rel, "said": bootstrap_ci(said).to_dict(),
                         "kept": bootstrap_ci(kept).to_dict(), "seconds": time.time() - t0, "rows": rows}
    print(cell, f"said {100*sum(said)/len(said):.1f} kept {100*sum(kept)/len(kept):.1f}  {time.time()-t0:.0f}s", flush=True)
    Path(a.output).write_text(json.dumps(out, indent=1))
