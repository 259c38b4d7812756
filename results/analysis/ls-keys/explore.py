"""Exploration behind editor.ls_keys (kept as run; it patches MENDEditor._accumulate, written before the option existed).

The least-squares editor runs/ls8/best on ZsRE's TRAIN split (no test case): each of the first K records edited alone
(the runner, both protocols), then the first N records in one call (analyze batch's study), for keys from every token
with a gradient ("all", as trained), only the answer positions ("answer"), or every token with zero value changes
outside the answer positions ("answer_zero"); TEXT_WEIGHT > 0 adds a preservation sample (the locality prompts + answers
of train records 300..699) to every solve. One JSON line per run: train-split-exploration.jsonl.

    OMP_NUM_THREADS=1 .venv/bin/python results/analysis/ls-keys/explore.py MODE 64,256 64 1.0 [TEXT_WEIGHT] [EDITOR_DIR]
"""
import dataclasses, sys, time, json
import torch
torch.set_num_threads(1)
from instructedit.api import query_setup
from instructedit.editors.mend import MENDEditor
import instructedit.editors.mend as M
from instructedit.editors.hooks import Factors
from instructedit.evaluation.runner import evaluate
from instructedit.models.loading import load_model
from instructedit.tasks.instructions import InstructionPool
from instructedit.tasks.splits import load_task_splits
from instructedit.tasks.collate import Collator
from instructedit.analysis.many_edits import batch_study
from instructedit.losses import per_row_nll
from instructedit.editors.hooks import capture_factors
from instructedit.editors.aggregation import value_differences

mode, sizes, K, scale = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]), float(sys.argv[4])
text_weight = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
editor_dir = sys.argv[6] if len(sys.argv) > 6 else "runs/ls8/best"
N = max(sizes)
model, tok = load_model("smollm2-135m-instruct")
ed = MENDEditor.from_pretrained(editor_dir); ed.eval()
with torch.no_grad(): ed.edit_lrs.mul_(scale)
setup = query_setup(editor_dir)
pool = InstructionPool.default(); pool = dataclasses.replace(pool, template=setup["template"]) if setup["template"] else pool
ins = pool.evaluation_index("seen")
recs = load_task_splits("zsre").train[:N]

def _accumulate(self, split, chunk, state, systems):
    state = state if state is not None else split.prefix(chunk)
    with torch.enable_grad(), capture_factors(split.model, self.weights) as capture:
        logits = split.logits_at(split.suffix(state), chunk.label_mask)
        losses = per_row_nll(logits, chunk.labels[chunk.label_mask], chunk.label_rows, chunk.n_rows)
        factors = capture.factors(losses.sum())
    if mode == "answer":
        factors = {n: Factors(u=f.u[k], delta=f.delta[k]) for n, f in factors.items()
                   for k in [chunk.label_mask[f.rows, f.positions]]}
    answer = {n: chunk.label_mask[f.rows, f.positions] for n, f in factors.items()} if mode == "answer_zero" else None
    for i, w, keys, keys_t, deltas_t in self.network_outputs(factors):
        d = value_differences(keys, keys_t, deltas_t, self.edit_lrs[i])
        if answer is not None:
            d = d * answer[w.name][:, None]
        systems[w.name].add(keys, d)
    return losses.detach().sum()
M.MENDEditor._accumulate = _accumulate

from instructedit.analysis.many_edits import key_memory, locality_texts
import contextlib
coll0 = Collator(tok, 1024, pool, answer_stop=setup["answer_stop"])
texts = locality_texts(load_task_splits("zsre").train[300:700])
memory_ctx = (lambda: ed.remembering(key_memory(ed, model, coll0, texts, past_weight=0.0, text_weight=text_weight))) if text_weight else contextlib.nullcontext
out = {"text_weight": text_weight, "mode": mode, "sizes": sizes, "K": K, "scale": scale, "editor": editor_dir}
t = time.perf_counter()
with memory_ctx():
  rep = evaluate(model, tok, ed, recs[:K], pool, ins, progress=False, protocol="both", answer_stop=setup["answer_stop"], fast=False)
agg = rep.to_dict()["aggregates"] if hasattr(rep, "to_dict") else None
def pick(a):
    flat = {}
    def walk(d, p=""):
        if isinstance(d, dict):
            if "mean" in d and not isinstance(d["mean"], dict): flat[p] = round(d["mean"], 3); return
            for k, v in d.items(): walk(v, p + "/" + str(k))
    walk(a); return {k: v for k, v in flat.items() if "post" in k and ("reliability" in k or "locality" in k) and "f1" not in k}
out["single"] = pick(agg) if agg else str(rep)[:500]
out["single_s"] = time.perf_counter() - t
coll = Collator(tok, 1024, pool, answer_stop=setup["answer_stop"]) if "answer_stop" in Collator.__init__.__code__.co_varnames else Collator(tok, 1024, pool)
t = time.perf_counter()
with memory_ctx():
  res = batch_study(model, tok, ed, coll, recs, ins, sizes, progress=False)
for p in res["points"]:
    out[f"batch{p['n_edits']}"] = {k: round(v["mean"], 3) for k, v in p.items() if isinstance(v, dict) and v} | {"s": round(p["seconds"], 1)}
print(json.dumps(out))
