"""Seconds per edit of N edits in one call against one edit per call; writes benchmarks/results/batch_edit.json.

For each ``--editor`` (a summing and a least-squares MEND editor, say), on the default model and
held-out ZsRE edits (test split): ``InstructEditor.apply`` with ONE edit (each of ``--singles``
different edits, the median) and with ``--n`` edits in one call (``--reps`` times), the two
interleaved in one process so that machine noise hits both alike. Every call is rolled back, and
the weights are checked bit for bit at the end. The ratio is (seconds per edit at N) / (seconds of
one edit): issue "Many edits" asks for at most 1/20.

    .venv/bin/python benchmarks/bench_batch_edit.py --editor runs/ls8/best --editor runs/r400/best [--n 256] [--threads 2]

``--rounds 1,8,32`` times the N-edit call at each number of rounds (default: the API's ``auto``), and ``--key-memory
--preserve-data FILE ...`` makes it hold a preservation sample still in every round, as the best held-out 256-edit call
does (``edit --file F --key-memory ...``; ``results/analysis/edit-rounds/blocks/``):

    .venv/bin/python benchmarks/bench_batch_edit.py --editor runs/ls8-answer/calibrated-r2 --rounds 32 --key-memory \
        --preserve-data ../shared/data/zsre/zsre_mend_train-1k.json --preserve 998 --preserve-weight 128000 --preserve-answers both

``--device cuda`` runs it on a GPU (each call timed to its last kernel: ``torch.cuda.synchronize``); the single edits are
always made as a user makes one (``apply`` with one edit: the editor's calibrated rounds and sample).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from instructedit.api import Edit, load_editor
from instructedit.commands.common import add_key_memory_arguments, check_key_memory_arguments, key_memory_from_arguments
from instructedit.io import write_json
from instructedit.models.loading import load_model
from instructedit.tasks.splits import load_task_splits

from common import add_common_arguments  # benchmarks/common.py

logger = logging.getLogger("bench_batch_edit")
RESULTS = Path(__file__).resolve().parent / "results" / "batch_edit.json"


def zsre_edits(n: int, data_dir: str | None, seed: int) -> list[Edit]:
    """The first ``n`` held-out ZsRE cases as edits (the file the studies of issue "Many edits" use)."""
    records = load_task_splits("zsre", data_dir, seed=seed).test
    if len(records) < n:
        raise SystemExit(f"the ZsRE test file has {len(records)} cases, fewer than the {n} asked for")
    return [Edit(r.prompt, r.target_new, task=r.task, subject=r.subject) for r in records[:n]]


def timed_apply(editor, model, edits, tokenizer, **how) -> tuple[float, int]:
    """Seconds of one ``apply`` call (to its last kernel on a GPU), rolled back afterwards, and the rounds it kept (a
    round that raises the edits' loss is undone and ends the call)."""
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    edited = editor.apply(model, edits, tokenizer, **how)
    sync()
    seconds = time.perf_counter() - start
    edited.rollback()
    return seconds, edited.rounds_made


def parse_rounds(text: str) -> list[int | str]:
    rounds = [r.strip() for r in text.split(",") if r.strip()]
    if not rounds or any(r != "auto" and not (r.isdigit() and int(r) >= 1) for r in rounds):
        raise SystemExit(f"--rounds {text!r}: a comma list of round counts >= 1 or 'auto'")
    return [r if r == "auto" else int(r) for r in rounds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", action="append", required=True, help="a trained MEND editor folder; only read (repeatable)")
    parser.add_argument("--n", type=int, default=256, help="edits in the batched call (default 256)")
    parser.add_argument("--singles", type=int, default=12, help="single-edit calls per repetition (default 12)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, batched and single calls interleaved (default 3)")
    parser.add_argument("--rounds", default="auto", help="rounds of the N-edit call, a comma list (each timed; default: auto)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed calls of each kind first (a GPU's first calls compile and allocate)")
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'")
    add_key_memory_arguments(parser, "the N-edit call's solve", past=False,
                             also=" in every round (give --rounds K; a least-squares editor; the single edits keep the editor's own sample)")
    add_common_arguments(parser, RESULTS)
    args = parser.parse_args()
    if args.n < 2 or args.singles < 1 or args.reps < 1 or args.warmup < 0:
        parser.error("--n must be >= 2, --singles and --reps >= 1, --warmup >= 0")
    rounds = parse_rounds(args.rounds)
    args.task = "zsre"  # the preservation sample's format (key_memory_from_arguments)
    check_key_memory_arguments(args)
    args.past_weight = 0.0  # one call: the memory is the sample alone (as edit --file --key-memory makes it)
    if args.key_memory and ("auto" in rounds or args.preserve_data is None):
        parser.error("--key-memory: give --preserve-data FILE and --rounds K (auto is fitted to the editor's own sample)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model, device=args.device)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    edits = zsre_edits(args.n, args.data_dir, args.seed)
    editors = [(path, load_editor(path, device=args.device)) for path in args.editor]
    memories = {path: key_memory_from_arguments(args, editor.editor_for(model, tok), model, tok)[0] if args.key_memory else None
                for path, editor in editors}
    configs = [f"rounds={r}" for r in rounds]
    times: dict[str, dict[str, list[float]]] = {path: {"single": [], **{c: [] for c in configs}} for path in args.editor}
    kept: dict[str, dict[str, list[int]]] = {path: {c: [] for c in configs} for path in args.editor}
    for rep in range(-args.warmup, args.reps):  # negative: warm-up, not kept
        for path, editor in editors:
            for i in range(args.singles if rep >= 0 else 1):
                seconds, _ = timed_apply(editor, model, [edits[(max(rep, 0) * args.singles + i) % args.n]], tok)
                if rep >= 0:
                    times[path]["single"].append(seconds)
            for r, config in zip(rounds, configs):
                seconds, made = timed_apply(editor, model, edits, tok, rounds=r, memory=memories[path])
                if rep >= 0:
                    times[path][config].append(seconds)
                    kept[path][config].append(made)
                    logger.info("rep %d %s: single median %.3f s, %d edits (%s) %.1f s", rep, path,
                                statistics.median(times[path]["single"]), args.n, config, seconds)
    bitwise = all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

    rows = {}
    for path, editor in editors:
        single = statistics.median(times[path]["single"])
        calls = {}
        for config in configs:
            batched = statistics.median(times[path][config])
            calls[config] = {"batched_call_s": batched, "batched_s_per_edit": batched / args.n, "ratio_per_edit": batched / args.n / single,
                             "meets_target": batched / args.n / single <= 0.05, "rounds_made": kept[path][config]}
        first = calls[configs[0]]
        rows[path] = {
            "aggregation": getattr(getattr(editor.editor, "config", None), "aggregation", "sum"),
            "single_edit_s": single,
            **first,  # the first --rounds entry, under the keys the earlier files used
            "target_ratio": "<= 1/20 = 0.05",
            "calls": calls,
            "all_times_s": times[path],
        }
    report = {
        "benchmark": "seconds per edit: N edits in one call vs one edit per call (InstructEditor.apply, rolled back each time)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": args.model,
        "task": "zsre (held-out test file)",
        "n_edits": args.n,
        "singles_per_rep": args.singles,
        "reps": args.reps,
        "threads": args.threads,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "rounds": rounds,
        "key_memory": ({"preserve_data": args.preserve_data, "preserve": args.preserve, "preserve_start": args.preserve_start,
                        "preserve_weight": args.preserve_weight, "preserve_answers": args.preserve_answers,
                        "preserve_keys": args.preserve_keys} if args.key_memory else None),
        "warmup": args.warmup,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_1min": list(os.getloadavg()),
        "weights_restored_bitwise": bitwise,
        "editors": rows,
    }
    write_json(args.output, report)
    for path, row in rows.items():
        for config, call in row["calls"].items():
            print(f"{path} ({row['aggregation']}): one edit {row['single_edit_s']:.3f} s; {args.n} in one call ({config}) "
                  f"{call['batched_call_s']:.1f} s = {call['batched_s_per_edit']:.4f} s/edit, ratio {call['ratio_per_edit']:.3f}")
    if not bitwise:
        raise SystemExit("the weights were not restored bit for bit")


if __name__ == "__main__":
    main()
