"""The evaluation runner (every query form, both protocols) on a least-squares editor at step sizes × SCALE whose
solves hold a preservation sample still (kept as run; exploration, not a CLI option yet).

    OMP_NUM_THREADS=1 .venv/bin/python results/analysis/ls-keys/train-scale/evaluate_scaled.py SCALE EDITOR PRESERVE_FILE \
        WEIGHT START END OUTPUT.json

PRESERVE_FILE: a ZsRE-format file whose first 400 records' locality prompts + answers are the preservation sample
(``counterfact_preservation.py`` writes CounterFact's in that format). START END: held-out ZsRE cases START..END-1.
"""

import dataclasses
import sys
from pathlib import Path

import torch

from instructedit.analysis.many_edits import key_memory, locality_texts
from instructedit.api import query_setup
from instructedit.config import DEFAULT_MODEL
from instructedit.editors.mend import MENDEditor
from instructedit.evaluation.report import EvalSettings, write_markdown, write_report_json
from instructedit.evaluation.runner import evaluate
from instructedit.models.loading import load_model
from instructedit.tasks.collate import Collator
from instructedit.tasks.instructions import InstructionPool
from instructedit.tasks.loaders import load_records
from instructedit.tasks.splits import load_task_splits

scale, editor_dir, preserve_file, weight = float(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
start, end, output = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
torch.manual_seed(0)
model, tokenizer = load_model(DEFAULT_MODEL)
editor = MENDEditor.from_pretrained(editor_dir).eval()
with torch.no_grad():
    editor.edit_lrs.mul_(scale)
setup = query_setup(editor_dir)
pool = InstructionPool.default()
pool = dataclasses.replace(pool, template=setup["template"]) if setup["template"] else pool
collator = Collator(tokenizer, 1024, pool, answer_stop=setup["answer_stop"])
texts = locality_texts(load_records(Path(preserve_file), "zsre").records[:400])
memory = key_memory(editor, model, collator, texts, past_weight=0.0, text_weight=weight)
records = load_task_splits("zsre").test[start:end]
settings = EvalSettings(task="zsre", split="test", method=f"least squares x{scale:g}, preservation {weight:g} ({preserve_file})")
with editor.remembering(memory):
    report = evaluate(model, tokenizer, editor, records, pool, pool.evaluation_index("seen"), settings=settings,
                      answer_stop=setup["answer_stop"])
write_report_json(report, output)
write_markdown([report], output.replace(".json", ".md"))
print(f"wrote {output}")
