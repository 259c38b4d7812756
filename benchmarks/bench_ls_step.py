"""Speed of the recommended recipe's training step on the default model, side by side in one process; writes
benchmarks/results/ls_step.json.

Config: configs/smollm2-135m/least-squares.yaml (least squares over the answer tokens' keys, 8 edits solved together
per step: ``objective.many_edits_loss``), its first --steps batches of the training split, every step from the same
editor state (its statistics restored), interleaved repetitions:
(a) one plain forward pass over the step's edit inputs (the padded batch, full vocabulary logits: the floor),
(b) the step as the code before 2026-12-03 ran it (``reference_means``: the scored inputs padded, and each chunk's
    checkpoint segment holding the frozen prefix too, so backward ran all 30 blocks again),
(c) the step padded (the frozen prefix once per chunk, outside the checkpoint),
(d) the step packed, as the Trainer runs it where packing gives the padded loss (``packing_matches(many=True)``): since
    2026-12-06 (session 51) the lower blocks pass each packed row's edit inputs and scored rows after the task
    instructions they keep (``models.split.StartCache``; kept after the warm-up, as in training once an instruction
    came twice),
(e) the step packed as before that: every token through the lower blocks (the split model's kept starts switched off).
Medians per step and their ratios; the losses of (b)-(d) are reported beside (equal up to float rounding).

    .venv/bin/python benchmarks/bench_ls_step.py [--reps 3] [--steps 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from instructedit import objective
from instructedit.io import write_json
from instructedit.models.split import StartCache
from instructedit.training import record_at

from common import recipe_setup  # benchmarks/common.py

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m" / "least-squares.yaml"
RESULTS = Path(__file__).resolve().parent / "results" / "ls_step.json"


def reference_means(split, batch, params, terms, chunk, packed=False):
    """``objective._scored_means`` as it was: the whole chunk (frozen prefix included) one checkpoint segment."""

    def chunk_sums(split, piece, params, terms):
        return objective._chunk_sums(split, piece, params, terms, split.prefix(piece))

    totals: dict[str, torch.Tensor] = {}
    for piece in batch.chunks(chunk):
        sums = checkpoint(chunk_sums, split, piece, params, terms, use_reentrant=False)
        totals = {k: totals[k] + v for k, v in sums.items()} if totals else sums
    n_positions, n_rows = int(batch.label_mask.sum()), batch.n_rows
    return {k: v / (n_rows if k in ("acc_pre", "acc", "unchanged") else n_positions) for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="training batches, each timed --reps times per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-reference", action="store_true", help="skip (b), the slowest")
    args = parser.parse_args()
    config, model, tok, data, editor, split = recipe_setup(CONFIG, args.threads)
    t = config.training
    batches = []
    for k in range(args.steps):
        records = [record_at(data.train, t.seed, k * t.n_edits + i) for i in range(t.n_edits)]
        batches.append(data.collator.meta_batch(records, data.instructions(records, config.data.instruction_seed), t.edit_loss_on))
    packs = objective.packing_matches(editor, split, batches[0], many=True)
    state = copy.deepcopy(editor.state_dict())
    current = objective._scored_means
    losses: dict[str, list[float]] = {"reference": [], "padded": [], "packed": [], "packed_whole": []}
    kept_starts, no_starts = split.starts, StartCache()
    no_starts.usable = False  # every row passed whole (``prefix_after_start``'s usual pass)

    def step(variant: str, batch) -> None:
        editor.load_state_dict(state)  # every step from the same editor (its statistics would move)
        editor.train()
        objective._scored_means = reference_means if variant == "reference" else current
        split.starts = no_starts if variant == "packed_whole" else kept_starts
        try:
            loss, _ = objective.many_edits_loss(editor, split, batch, t.c_edit, t.c_loc, t.c_margin, t.c_answer_margin,
                                                t.answer_margin_cap, chunk=config.editor.chunk_edits,
                                                packed=variant.startswith("packed") and packs)
        finally:
            objective._scored_means = current
            split.starts = kept_starts
        loss.backward()
        editor.zero_grad(set_to_none=True)
        losses[variant].append(float(loss.detach()))

    def forward(batch) -> None:
        with torch.no_grad():
            model(input_ids=batch.edit_inner.input_ids, attention_mask=batch.edit_inner.attention_mask)

    variants = (("b_reference_step", "reference"), ("c_padded_step", "padded"), ("d_packed_step", "packed"),
                ("e_packed_whole_step", "packed_whole"))
    fns = {"a_forward": forward, **{name: (lambda b, v=v: step(v, b)) for name, v in variants
                                     if not (args.no_reference and v == "reference")}}
    for batch in batches:  # the kept instructions, as in training once each came twice
        step("packed", batch)
    for fn in fns.values():
        fn(batches[0])  # warm-up
    for kept in losses.values():
        kept.clear()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(args.reps):
        for batch in batches:
            order = list(fns.items()) if rep % 2 == 0 else list(fns.items())[::-1]
            for name, fn in order:
                start = time.perf_counter()
                fn(batch)
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": config.model.name,
        "config": str(CONFIG.relative_to(CONFIG.parents[2])),
        "n_edits": t.n_edits,
        "packed": packs,
        "steps": args.steps,
        "reps": args.reps,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "tokens_per_step": [{"edit_inner": list(b.edit_inner.input_ids.shape), "edit_outer": list(b.edit_outer.input_ids.shape),
                             "loc": list(b.loc.input_ids.shape), "real": int(sum(int(x.attention_mask.sum()) for x in
                                                                                 (b.edit_inner, b.edit_outer, b.loc, b.unlikely) if x is not None))}
                            for b in batches],
        "median_s": med,
        "ratios": {"c_over_a": med["c_padded_step"] / med["a_forward"], "d_over_a": med["d_packed_step"] / med["a_forward"],
                   "e_over_a": med["e_packed_whole_step"] / med["a_forward"], "d_over_e": med["d_packed_step"] / med["e_packed_whole_step"],
                   **({} if args.no_reference else {"b_over_a": med["b_reference_step"] / med["a_forward"],
                                                     "d_over_b": med["d_packed_step"] / med["b_reference_step"],
                                                     "c_over_b": med["c_padded_step"] / med["b_reference_step"]})},
        "kept_starts": {"reused_tokens": kept_starts.reused_tokens, "passed_tokens": kept_starts.passed_tokens,
                        "starts": len(kept_starts.starts)},
        "first_losses": {k: v[: args.steps] for k, v in losses.items()},
        "all_times_s": times,
    }
    write_json(args.output, report)
    print(json.dumps({k: report[k] for k in ("median_s", "ratios", "first_losses")}, indent=2))


if __name__ == "__main__":
    main()
