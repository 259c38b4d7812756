"""Does the edited model stop after the new answer, in every form it is asked? (results/analysis/answer-end/, README.md)

For each held-out ZsRE case: the edit made as the editor makes it (its edit forms), every edit input's answer ending in
the stop under test (``answer_stop``: newline, as trained; eos: the tokenizer's EOS, which for SmolLM2 is also the chat
template's end of turn; newline+turn: the chat form's answer ends the turn, the others a newline). The edited model is
asked the question instruction-wrapped, bare, and as a chat user turn, and decodes greedily until EOS or the budget (no
newline stop: what `model.generate` or a chat interface shows):
  said: the first line is the target (exact match, as the evaluation runner scores it);
  ends: the whole continuation is the target (nothing after it but whitespace, within the budget);
  kept: the whole continuation of the case's locality question (bare, and as a chat turn) is the unedited model's.
Generation protocol, 95 % bootstrap intervals over the cases."""
import argparse, sys, time
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
p.add_argument("--n", type=int, default=60)
p.add_argument("--budget", type=int, default=32)
p.add_argument("--stops", default="newline,eos")
p.add_argument("--output", required=True)
a = p.parse_args()
torch.manual_seed(0)
model, tok = load_model("smollm2-135m-instruct")
ed = load_editor(a.editor)
records = [r for r in load_records(Path(a.data)).records if r.locality][a.start : a.start + a.n]
def chat(q): return tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
def ends(reply, target): return float(normalize_answer(reply) == normalize_answer(target) and "\n" not in reply.strip())
LOC_FORMS = {"plain": lambda q: q, "chat": chat}
before = {(i, f): generate(model, tok, ask(r.locality[0].prompt), a.budget) for i, r in enumerate(records) for f, ask in LOC_FORMS.items()}
out = {"editor": a.editor, "edit_forms": list(ed.edit_forms), "data": a.data, "start": a.start, "n": len(records), "budget": a.budget,
       "command": " ".join(sys.argv), "threads": torch.get_num_threads(), "protocol": "generation", "stops": {}}
for stop in a.stops.split(","):
    ed.answer_stop = stop
    scores: dict[str, list[float]] = {}
    answers = []
    t0 = time.time()
    for i, r in enumerate(records):
        edit = Edit(prompt=r.prompt, target=r.target_new, task="zsre")
        asks = {"wrapped": ed.wrap(edit), "plain": r.prompt, "chat": chat(r.prompt)}
        with ed.apply(model, edit, tok) as em:
            replies = {form: em.generate(prompt, a.budget) for form, prompt in asks.items()}
            loc = {f: em.generate(ask(r.locality[0].prompt), a.budget) for f, ask in LOC_FORMS.items()}
        for form, reply in replies.items():
            scores.setdefault(f"said/{form}", []).append(float(exact_match(first_line(reply), r.target_new)))
            scores.setdefault(f"ends/{form}", []).append(ends(reply, r.target_new))
        for f in LOC_FORMS:
            scores.setdefault(f"kept/{f}", []).append(float(loc[f].strip() == before[(i, f)].strip()))
        answers.append({"case": a.start + i, "target": r.target_new, "replies": replies,
                        "locality_before": {f: before[(i, f)] for f in LOC_FORMS}, "locality_after": loc})
    out["stops"][stop] = {"seconds": time.time() - t0, "metrics": {k: bootstrap_ci(v).to_dict() for k, v in scores.items()},
                          "answers": answers}
    m = out["stops"][stop]["metrics"]
    print(stop, {k: f"{100*v['mean']:.1f} [{100*v['ci_low']:.1f}, {100*v['ci_high']:.1f}]" for k, v in m.items()}, flush=True)
    write_json(Path(a.output), out)
