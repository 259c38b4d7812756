"""Exploration (kept as run): every N-edit call of `analyze batch` also carries H "hold" rows: NQ locality questions
of --preserve-data (none the study measures) continued with the unedited model's own greedy answer, solved together
with the edits as if they were edits of the answer the model already gives. Round 1 asks little of them (the model
says them already); in later rounds, where the edits have moved an answer, their gradient asks it back: an active
counterpart of the preservation sample's passive key covariance.

    OMP_NUM_THREADS=1 .venv/bin/python results/analysis/ls-keys/rounds/active/hold_answers.py --hold 256 \
        --hold-data ../shared/data/zsre/zsre_mend_train-1k.json --hold-start 598 -- analyze batch ...   (the study's own arguments)
"""

from __future__ import annotations

import argparse
import sys

import torch

import instructedit.analysis.many_edits as me
from instructedit.cli import main
from instructedit.records import TokenBatch
from instructedit.tasks.collate import IGNORE
from instructedit.tasks.loaders import load_records


def concat(a: TokenBatch, b: TokenBatch, pad: int) -> TokenBatch:
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def wide(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill)

    return TokenBatch(torch.cat([wide(a.input_ids, pad), wide(b.input_ids.to(a.input_ids.device), pad)]),
                      torch.cat([wide(a.attention_mask, 0), wide(b.attention_mask.to(a.input_ids.device), 0)]),
                      torch.cat([wide(a.labels, IGNORE), wide(b.labels.to(a.input_ids.device), IGNORE)]))


def run() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hold", type=int, required=True)
    p.add_argument("--hold-data", required=True)
    p.add_argument("--hold-start", type=int, default=0)
    ours, rest = p.parse_args(sys.argv[1 : sys.argv.index("--")]), sys.argv[sys.argv.index("--") + 1 :]
    study, edit_batch = me.batch_study, me._edit_batch

    def patched(model, tokenizer, editor, collator, records, instruction, sizes, *a, **k):
        measured = set(me.locality_texts(records[: max(sizes)]))
        pool = me.locality_texts(load_records(ours.hold_data).records[ours.hold_start :])
        texts = [t for t in pool if t not in measured][: ours.hold]
        said = [(prompt, ids) for prompt, ids in me.own_answers(model, tokenizer, texts) if ids]
        hold = me.continuation_batch(collator, said)
        print(f"hold rows: {len(said)} of {len(texts)} questions (own answers, {int(hold.label_mask.sum())} tokens)", flush=True)

        def with_hold(coll, recs, instr):
            batch = edit_batch(coll, recs, instr)
            return concat(batch, hold, coll.pad_id) if len(recs) > 1 else batch

        me._edit_batch = with_hold
        return study(model, tokenizer, editor, collator, records, instruction, sizes, *a, **k)

    me.batch_study = patched
    return main(rest)


if __name__ == "__main__":
    sys.exit(run())
