"""What the wrapped + plain editor says to CounterFact validation questions, wrapped and bare (kept as run).

The first 16 CounterFact records of the run's validation split (those with a locality prompt), each edited alone by
runs/ls8-answer/calibrated-plain (wrapped + plain edit inputs, ×2, preservation weight 1000), as ``calibrate`` scores
them (``generation_scores``): per record the wrapped question, the bare question and the locality prompt, the unedited
and the edited greedy answer.

    OMP_NUM_THREADS=1 .venv/bin/python results/analysis/plain-edit-row/counterfact-plain-answers.py > results/analysis/plain-edit-row/counterfact-plain-answers.txt
"""
import torch, dataclasses
from instructedit.config import load_config
from instructedit.runs import CONFIG as RUN_CONFIG
from instructedit.models.loading import load_model
from instructedit.training import prepare_data
from instructedit.editors.mend import MENDEditor
from instructedit.evaluation import generation_check as gc
from instructedit.evaluation.generation import exact_match, first_line
torch.set_num_threads(1)
config = load_config("runs/ls8-answer/" + RUN_CONFIG)
config = dataclasses.replace(config, training=dataclasses.replace(config.training, val_size=400, edit_forms=["wrapped", "plain"]))
model, tok = load_model(config.model.name)
data = prepare_data(config, tok)
editor = MENDEditor.from_pretrained("runs/ls8-answer/calibrated-plain").eval()
recs = [r for r in data.val if r.task == "counterfact" and r.locality][:16]
ins = data.instructions(recs, config.data.instruction_seed)
orig = gc.greedy_before_after
def spy(model, tok, split, prompts, budgets, *a, **k):
    before, after = orig(model, tok, split, prompts, budgets, *a, **k)
    for p, b, x in zip(prompts, before, after[0]):
        print(repr(p[-60:]), "|", repr(b[:40]), "->", repr(x[:50]))
    return before, after
gc.greedy_before_after = spy
print(gc.generation_scores(model, tok, editor, data.collator, recs, ins, (1.0,)))
