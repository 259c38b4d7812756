"""The generation protocol's answers before and after the edits, with and without the rows a prompt asked twice shares.

The evaluation runner asks each case, beside its own questions, the next case's question in its frame (in-frame
locality): in the plain and chat forms those are the next case's own plain and chat questions, the same tokens under
another edit. ``before_after.greedy_before_after`` prefills such a prompt and answers it unedited once, and replays that
row under each edit (``_same_prompts``). This script runs one evaluation of the first ``--n`` test cases (both
protocols), keeps the runner's first call of ``greedy_before_after`` (one group of cases decoded together, as the runner
makes it), and times that call again with the rows shared and with every prompt on rows of its own (as before
2026-12-07), alternated ``--repeats`` times: wall and CPU seconds, their medians and ratio, and whether the answers are
the same. Timing the one call leaves out the teacher-forced passes and edits, whose noise on a shared machine hides a
second or two of a 25-second evaluation (``bench_eval.py --unshared-prompts-too`` times whole evaluations).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_shared_prompts.py --editor runs/ls8-answer/calibrated-r4 \\
        --task counterfact [--n 30] [--repeats 6] [--threads 2] [--output FILE]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import time
from pathlib import Path

import torch

from instructedit.config import DEFAULT_MODEL
from instructedit.evaluation import generation_probes
from instructedit.io import write_json

from bench_eval import EvalSetup, unshared_prompts  # benchmarks/bench_eval.py
from common import cpu_name  # benchmarks/common.py

RESULTS = Path(__file__).resolve().parent / "results" / "shared_prompts.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", required=True)
    parser.add_argument("--task", default="counterfact")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    setup = EvalSetup.load(args.editor, DEFAULT_MODEL, args.task, args.n)
    calls = []
    real = generation_probes.greedy_before_after
    generation_probes.greedy_before_after = lambda *a, **k: calls.append((a, k)) or real(*a, **k)
    try:
        setup.evaluate("both")
    finally:
        generation_probes.greedy_before_after = real
    a, k = calls[0]
    times: dict[str, dict[str, list[float]]] = {"shared": {"wall": [], "cpu": []}, "unshared": {"wall": [], "cpu": []}}
    answers = {}
    for r in range(args.repeats):
        for name in ("shared", "unshared"):
            wall, cpu = time.perf_counter(), time.process_time()
            if name == "shared":
                answers[name] = real(*a, **k)
            else:
                with unshared_prompts():
                    answers[name] = real(*a, **k)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
        print(f"repeat {r + 1}: shared {times['shared']['wall'][-1]:.2f} s, unshared {times['unshared']['wall'][-1]:.2f} s", flush=True)
    medians = {name: {kind: statistics.median(v) for kind, v in t.items()} for name, t in times.items()}
    prompts = a[3]
    result = {
        "benchmark": "greedy_before_after's first call of an evaluation (one group of cases), prompts asked twice sharing "
                     "their prefill and unedited rows against rows of their own, alternated",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "editor": args.editor, "task": args.task, "n_cases": args.n, "threads": args.threads, "cpu": cpu_name(),
        "torch": torch.__version__, "prompts": len(prompts), "distinct_prompts": len(set(prompts)),
        "seconds": times, "median_s": medians,
        "shared_over_unshared": {kind: medians["shared"][kind] / medians["unshared"][kind] for kind in ("wall", "cpu")},
        "shared_over_unshared_per_repeat": [s / u for s, u in zip(times["shared"]["wall"], times["unshared"]["wall"])],
        "same_answers": answers["shared"] == answers["unshared"],
    }
    write_json(args.output, result)
    print(f"{len(prompts)} prompts ({len(set(prompts))} distinct): shared {medians['shared']['wall']:.2f} s, unshared "
          f"{medians['unshared']['wall']:.2f} s ({result['shared_over_unshared']['wall']:.2f}x); same answers: {result['same_answers']}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
