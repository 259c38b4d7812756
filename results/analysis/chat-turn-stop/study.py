"""Does the edited model close its chat turn after the new answer? (results/analysis/chat-turn-stop/, README.md)

For each held-out ZsRE case: the edit made as the editor makes it (its edit forms), with the chat edit input's answer ending
in a newline (answer_stop newline, as trained) or in the chat template's end of turn (newline+turn). Asked the question as a
chat user turn, the edited model decodes greedily until EOS or the budget (no newline stop: what a chat interface shows):
  said: the first line is the target (exact match, as the evaluation runner scores it);
  turn ends: the whole reply is the target (the turn closed right after it, within the budget);
  kept: the whole chat reply to the case's locality question is the unedited model's (same decoding).
Generation protocol, 95 % bootstrap intervals over the cases."""
import argparse, json, os, sys, time
from pathlib import Path
import torch
from instructedit.api import Edit, generate, load_editor
from instructedit.evaluation.generation import bootstrap_ci, exact_match, first_line, normalize_answer
from instructedit.io import write_json
from instructedit.models.loading import load_model
from instructedit.tasks.loaders import load_records

p = argparse.ArgumentParser()
p.add_argument("--editor", required=True)
p.add_argument("--data", default="../shared/data/zsre/zsre_mend_eval_portability_gpt4.json")
p.add_argument("--start", type=int, default=0)
p.add_argument("--n", type=int, default=100)
p.add_argument("--budget", type=int, default=32)
p.add_argument("--output", required=True)
a = p.parse_args()
torch.manual_seed(0)
model, tok = load_model("smollm2-135m-instruct")
ed = load_editor(a.editor)
records = [r for r in load_records(Path(a.data)).records if r.locality][a.start : a.start + a.n]
def chat(q): return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
before = {i: generate(model, tok, chat(r.locality[0].prompt), a.budget) for i, r in enumerate(records)}
out = {"editor": a.editor, "edit_forms": list(ed.edit_forms), "data": a.data, "start": a.start, "n": len(records), "budget": a.budget,
       "command": " ".join(sys.argv), "threads": torch.get_num_threads(), "stops": {}}
for stop in ("newline", "newline+turn"):
    ed.answer_stop = stop
    said, ends, kept, answers = [], [], [], []
    t0 = time.time()
    for i, r in enumerate(records):
        with ed.apply(model, Edit(prompt=r.prompt, target=r.target_new, task="zsre"), tok) as em:
            reply = em.generate(chat(r.prompt), a.budget)
            loc = em.generate(chat(r.locality[0].prompt), a.budget)
        said.append(float(exact_match(first_line(reply), r.target_new)))
        ends.append(float(normalize_answer(reply) == normalize_answer(r.target_new) and "\n" not in reply.strip()))
        kept.append(float(loc.strip() == before[i].strip()))
        answers.append({"case": a.start + i, "target": r.target_new, "reply": reply, "locality_before": before[i], "locality_after": loc})
    out["stops"][stop] = {"seconds": time.time() - t0, **{k: bootstrap_ci(v).to_dict() for k, v in
                          (("said", said), ("turn_ends", ends), ("kept", kept))}, "answers": answers}
    s = out["stops"][stop]
    print(stop, {k: f"{100*s[k]['mean']:.1f} [{100*s[k]['ci_low']:.1f}, {100*s[k]['ci_high']:.1f}]" for k in ("said", "turn_ends", "kept")}, flush=True)
write_json(Path(a.output), out)
