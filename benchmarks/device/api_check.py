"""The Python API on a GPU with editors loaded as users load them (on the CPU, the default): the gpu_check's ``api`` stage.

    python3 benchmarks/device/api_check.py EDITOR_DIR MODEL_DIR [--device cuda] [--cases 4]

Checks, each printed as one JSON line and all together at the end:
- ``apply``: one edit through ``load_editor(dir)`` (CPU) on a model on the device; rolled back bit for bit.
- ``apply_sequential`` with a ``KeyMemory`` (earlier edits' keys and a preservation sample, the sample taken while the
  editor was still on the CPU), then ``rollback_to(1)`` of a sequence made without a memory; restored bit for bit.
- ``evaluate``: the runner with ``MENDEditor.from_pretrained(dir)`` on the CPU and the model on the device, both
  protocols, a few held-out ZsRE cases.
Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/common.py

from common import trained_queries  # noqa: E402

from instructedit.analysis.many_edits import key_memory, locality_texts  # noqa: E402
from instructedit.api import Edit, load_editor  # noqa: E402
from instructedit.editors.mend import MENDEditor  # noqa: E402
from instructedit.evaluation.runner import evaluate  # noqa: E402
from instructedit.models.loading import load_model, max_input_length  # noqa: E402
from instructedit.tasks.collate import Collator  # noqa: E402
from instructedit.tasks.splits import load_task_splits  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("editor")
    parser.add_argument("model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args()
    model, tok = load_model(args.model, device=args.device)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    records = load_task_splits("zsre").test[: max(args.cases, 3)]
    edits = [Edit(r.prompt, r.target_new, task=r.task, subject=r.subject) for r in records]
    results = {}

    def check(name, run):
        start = time.perf_counter()
        try:
            found = run()
            restored = all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
            results[name] = {"ok": restored, "restored_bitwise": restored, **(found or {})}
        except Exception as error:  # noqa: BLE001 - recorded; the next check runs
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-1500:]}
            model.load_state_dict(original)
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps({name: results[name]}), flush=True)

    def apply_one():
        editor = load_editor(args.editor)  # on the CPU, as by default
        with editor.apply(model, edits[0], tok) as edited:
            said = edited.answer(edits[0].prompt, max_new_tokens=8)
        return {"said": said}

    def sequential_with_memory():
        editor = load_editor(args.editor)
        inner = editor.editor_for(model, tok)
        memory = key_memory(inner, model, Collator(tok, max_input_length(model)), locality_texts(records), 1.0, 1000.0)
        editor.apply_sequential(model, edits[:3], tok, memory=memory).rollback()
        plain = editor.apply_sequential(model, edits[:3], tok)
        plain.rollback_to(1)
        plain.rollback()
        return {}

    def runner_with_cpu_editor():
        editor = MENDEditor.from_pretrained(args.editor)  # on the CPU
        editor.eval()
        pool, made = trained_queries(args.editor)
        report = evaluate(model, tok, editor, records[: args.cases], pool, pool.evaluation_index("seen"), progress=False,
                          protocol="both", **made)
        return {"cases": len(report.cases), "timing": report.timing}

    check("apply", apply_one)
    check("apply_sequential", sequential_with_memory)
    check("evaluate", runner_with_cpu_editor)
    print(json.dumps({"all": results}))
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
