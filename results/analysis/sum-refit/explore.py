"""Does a preservation sample help a *summing* MEND editor? (exploration, kept as run)

A summing editor's update ΔW = α Σ δ̃ ũᵀ has no solve to hold a preservation sample in. This refits it by least
squares: ΔW'ᵀ = (KᵀK + w·C + ε·tr(KᵀK)/d I)⁻¹ KᵀK ΔWᵀ, with K the edited layers' inputs at the edit's answer
positions and C the preservation sample's mean key covariance (as ``MENDEditor.set_preservation``): the update's action
on the edit's own keys is kept as far as the sample allows, its action on the sample's directions is taken out.
Generation reliability / locality (``generation_scores``, wrapped prompt) on ZsRE's train split at several multipliers.

    OMP_NUM_THREADS=2 .venv/bin/python results/analysis/sum-refit/explore.py EDITOR N OUTPUT.json
"""

import json
import sys

import torch

from instructedit.analysis.many_edits import key_memory
from instructedit.api import query_setup
from instructedit.config import load_config
from instructedit.editors.base import EditResult
from instructedit.editors.mend import MENDEditor
from instructedit.evaluation.generation_check import generation_scores
from instructedit.models.loading import load_model
from instructedit.tasks.prepare import prepare_data
from instructedit.tasks.splits import load_task_splits


class Refit(MENDEditor):
    cov: dict[str, torch.Tensor] = {}
    weight = 0.0
    eps = 1e-3

    def edit(self, model, batch, state=None):  # noqa: ANN001, ANN201
        result = super().edit(model, batch, state)
        if not self.weight:
            return EditResult(result.new_params, result.updates, result.pre_edit_loss, None)
        split = self.split(model)
        factors, _ = self.edit_factors(split, batch)
        updates = {}
        for w in self.weights:
            f = factors[w.name].select(batch.label_mask[factors[w.name].rows, factors[w.name].positions])
            keys = f.u.float()
            gram = keys.T @ keys
            shift = result.updates[w.name].float()
            shift = shift if w.transposed else shift.T  # (d_in, d_out)
            ridge = self.eps * torch.trace(gram) / gram.shape[0]
            system = gram + self.weight * self.cov[w.name] + ridge * torch.eye(gram.shape[0])
            refit = torch.linalg.solve(system, gram @ shift)
            updates[w.name] = refit if w.transposed else refit.T
        return EditResult(self.edited_params(split, updates), updates, result.pre_edit_loss, None)


editor_dir, n, output = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
run = editor_dir.rsplit("/", 1)[0]
config = load_config(f"{run}/config.yaml")
model, tokenizer = load_model(config.model.name)
data = prepare_data(config, tokenizer)
editor = Refit.from_pretrained(editor_dir).eval()
assert query_setup(editor_dir)["template"] == config.data.template
texts = [(q.prompt, q.answer) for r in [r for r in data.train if r.locality][:400] for q in r.locality]
memory = key_memory(editor, model, data.collator, texts, past_weight=0.0, text_weight=1.0)  # only its covariance is used
Refit.cov = memory.text
records = load_task_splits("zsre").train[:n]
instructions = [data.pool.evaluation_index("seen")] * len(records)
results = []
for weight in (0.0, 1000.0, 10000.0):
    Refit.weight = weight
    scores = generation_scores(model, tokenizer, editor, data.collator, records, instructions, (1.0, 1.5, 2.0, 3.0), progress=True)
    for scale, v in scores.items():
        results.append({"weight": weight, "scale": scale, **v})
        print(f"weight {weight:g} x{scale:g}: said {v['gen_reliability']:.3f} kept {v['gen_locality']:.3f} (n={v['gen_n']})", flush=True)
json.dump({"editor": editor_dir, "records": f"ZsRE train split, first {n}", "sample": f"{len(texts)} texts", "points": results},
          open(output, "w"), indent=1)
