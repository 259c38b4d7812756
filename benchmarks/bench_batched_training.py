"""Records per second of meta-training with several records in one pass (``training.batch_size``) against one at a time.

Issue "Training and evaluation at the speed limit", item 2. On the default model with the recommended
recipe's objective (``configs/smollm2-135m/instructedit.yaml``), the same B records (from the training
stream, all tasks mixed) are trained on as B ``meta_loss`` calls (batch_size 1, the published recipe's
grad_accumulation) and as ONE ``batched_meta_loss`` pass (batch_size B), each record with its own edit
in both; forward and backward of the loss, interleaved repetitions, medians. Writes
``benchmarks/results/batched_training.json``.

    .venv/bin/python benchmarks/bench_batched_training.py [--sizes 2,4] [--reps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch

from instructedit.io import write_json
from instructedit.objective import batched_meta_loss, meta_loss, packing_matches

from common import recipe_setup  # benchmarks/common.py

RESULTS = Path(__file__).resolve().parent / "results" / "batched_training.json"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m" / "instructedit.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,4", help="records per pass to compare with one at a time (default 2,4)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    config, model, tok, data, editor, split = recipe_setup(CONFIG, args.threads)
    t = config.training
    records = data.train[: max(sizes)]  # the training stream's first records (its task mixture)
    batches = [data.collator.meta_batch([r], [data.pool.training_index(r, 0)], t.edit_loss_on) for r in records]
    if not packing_matches(editor, split, batches[0]):
        raise SystemExit("packed inputs do not reproduce the padded loss on this model: batched_meta_loss would not be used")
    terms = {"c_margin": t.c_margin, "c_answer": t.c_answer_margin, "answer_cap": t.answer_margin_cap, "c_context": t.c_loc_context}

    def one_at_a_time(n: int) -> None:
        editor.train()
        for batch in batches[:n]:
            loss, _ = meta_loss(editor, split, batch, t.c_edit, t.c_loc, packed=True, **terms)
            (loss / n).backward()
        editor.zero_grad(set_to_none=True)

    def together(n: int) -> None:
        editor.train()
        loss, _ = batched_meta_loss(editor, split, batches[:n], t.c_edit, t.c_loc, **terms)
        loss.backward()
        editor.zero_grad(set_to_none=True)

    runs = {f"{name}_{n}": (fn, n) for n in sizes for name, fn in (("one_at_a_time", one_at_a_time), ("together", together))}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn, n in runs.values():  # warm-up
        fn(n)
    for _ in range(args.reps):  # interleaved: machine noise hits every variant alike
        for key, (fn, n) in runs.items():
            start = time.perf_counter()
            fn(n)
            times[key].append(time.perf_counter() - start)
    per_size = {}
    for n in sizes:
        single, joint = statistics.median(times[f"one_at_a_time_{n}"]), statistics.median(times[f"together_{n}"])
        per_size[str(n)] = {"one_at_a_time_s": single, "together_s": joint, "records_per_s_one_at_a_time": n / single,
                            "records_per_s_together": n / joint, "speedup": single / joint}
    result = {
        "benchmark": "meta-training records per second: B records in one pass (batch_size B) vs one at a time (batch_size 1)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": config.model.name, "config": str(CONFIG.relative_to(CONFIG.parents[2])), "threads": args.threads, "reps": args.reps,
        "records": [f"{r.task}:{r.source}" for r in records], "torch": torch.__version__, "platform": platform.platform(),
        "sizes": per_size, "all_times_s": times,
    }
    write_json(args.output, result)
    for n, row in per_size.items():
        print(f"{n} records: one at a time {row['one_at_a_time_s']:.3f} s, together {row['together_s']:.3f} s ({row['speedup']:.2f}x)")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
