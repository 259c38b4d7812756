"""Does a second edit row in the chat form make a least-squares edit come out in chat form? (no retraining)

The recommended editor (trained on instruction-wrapped edit inputs only) edits each held-out ZsRE case from its wrapped
edit input alone, and then from the wrapped input plus the same question in the chat form (the user turn, the target as
the assistant's answer), solved together; both are evaluated with every query form (generation and teacher-forced).

    .venv/bin/python results/analysis/chat-edit-row/probe.py [--editor runs/ls8-answer/calibrated] [--n 100] [--extra-scales 1.333,1.667] [--skip-plain] [--split test] [--output FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from instructedit.editors.mend import MENDEditor
from instructedit.evaluation.generation_check import scaled_step_sizes
from instructedit.evaluation.runner import evaluate
from instructedit.io import write_json
from instructedit.models.loading import load_model
from instructedit.tasks.collate import Collator, chat_query
from instructedit.tasks.splits import load_task_splits
from instructedit.api import query_setup
from instructedit.tasks.instructions import InstructionPool

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", default="runs/ls8-answer/calibrated")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--extra-scales", default="",
                        help="comma-separated: also run the two edit inputs with the step sizes times each (on top of the editor's calibration)")
    parser.add_argument("--skip-plain", action="store_true", help="only the runs with --extra-scales")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"),
                        help="which ZsRE split (test: the held-out file; train: zsre_mend_train-1k.json's training part)")
    parser.add_argument("--output", type=Path, default=HERE / "probe.json")
    args = parser.parse_args()
    editor = MENDEditor.from_pretrained(args.editor).eval()
    model, tokenizer = load_model(editor.model_name)
    setup = query_setup(args.editor)  # the template the editor was trained with, and its answer stop
    pool = InstructionPool.default()
    pool = dataclasses.replace(pool, template=setup["template"]) if setup["template"] else pool
    instruction, answer_stop = pool.evaluation_index("seen"), setup["answer_stop"]
    records = getattr(load_task_splits("zsre"), args.split)[: args.n]
    plain_pairs = Collator.edit_pairs

    def with_chat(self: Collator, record, index):  # the wrapped edit input, then the chat form of the same question
        pairs = plain_pairs(self, record, index)
        chat = chat_query(self.tokenizer, record.prompt) if record.convsent is None else None
        return pairs + ([(chat, record.target_new)] if chat is not None else [])

    out = {"editor": args.editor, "n": len(records), "task": f"zsre {args.split} split, cases 0..n-1", "runs": {}}
    runs = [] if args.skip_plain else [("wrapped edit input", plain_pairs, 1.0), ("wrapped + chat edit inputs", with_chat, 1.0)]
    runs += [(f"wrapped + chat edit inputs, step sizes x{float(x):g}", with_chat, float(x)) for x in args.extra_scales.split(",") if x]
    for name, pairs, scale in runs:
        Collator.edit_pairs = pairs
        try:
            with scaled_step_sizes(editor, scale):
                report = evaluate(model, tokenizer, editor, records, pool, instruction, answer_stop=answer_stop)
        finally:
            Collator.edit_pairs = plain_pairs
        agg = report.aggregates["zsre"]
        out["runs"][name] = {phase: {k: s.to_dict() for k, s in agg[phase].items() if "/" not in k} for phase in ("post", "gen_post")}
        keys = ("gen_reliability", "gen_reliability_plain", "gen_reliability_chat", "gen_locality")
        out["runs"][name]["per_case"] = {k: [c.gen_post.get(k) for c in report.cases] for k in keys}  # for slices
        g = agg["gen_post"]
        print(f"{name}: said {g['gen_reliability'].mean:.3f}, plain {g['gen_reliability_plain'].mean:.3f}, "
              f"chat {g['gen_reliability_chat'].mean:.3f} (F1 {g['gen_reliability_chat_f1'].mean:.3f}), kept {g['gen_locality'].mean:.3f}, "
              f"TF locality {agg['post']['locality'].mean:.3f}")
    write_json(args.output, out)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
