"""How far the evaluation's matrix products are from this CPU's speed: the ceiling they leave on cases per second.

One evaluation of the first ``--n`` test cases of ``--task`` (both protocols by default) runs under ``torch.profiler``
with shapes recorded. Each matrix product it made (``aten::mm``: the model's linear layers through BLAS, the vocabulary
projections, the MEND network; ``mkldnn::_linear_pointwise``: those ``fast_linears`` routes through oneDNN) is then
timed alone as ``a @ b`` of its shape and dtype (a oneDNN product too: 13 of ~23,000 in a 30-case run on the default
model), its operands made afresh and hot in cache (median of ``--reps`` after a warm-up, one shape at a time), so
the isolated rate is an upper bound on the speed the product could have in the run. The JSON gives, by row count and
weight shape: calls, GFLOP, seconds in the run and alone; the evaluation's wall time outside the profiler; and the
ceiling: the cases per second the evaluation would reach if every product ran at its isolated rate and nothing else
changed. Beside it, the CPU's peak float32 and bfloat16 rates on one large product (2048³).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_eval_products.py --editor runs/ls8-answer/best --task counterfact \
        --threads 2 [--n 30] [--protocol both] [--repeats 3] [--output FILE]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import profile

from instructedit.io import write_json

from bench_eval import DEFAULT_MODEL, EvalSetup  # benchmarks/bench_eval.py
from common import cpu_name  # benchmarks/common.py

RESULTS = Path(__file__).resolve().parent / "results" / "eval_products.json"
PRODUCTS = ("aten::mm", "mkldnn::_linear_pointwise")
ROW_BUCKETS = (1, 8, 32, 128, 512, 4096)  # a product's rows are reported in the first bucket they fit


def _rate(m: int, k: int, n: int, dtype: torch.dtype, reps: int) -> float:
    """Median seconds of an (m × k) · (k × n) product alone, operands hot in cache."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _shape(event) -> tuple[int, int, int, str] | None:
    """(rows, inner, outputs, dtype) of a product event; None where its shapes were not recorded as two matrices."""
    shapes = event.input_shapes or []
    if len(shapes) < 2 or len(shapes[0]) != 2 or len(shapes[1]) != 2:
        return None
    (m, k), (k2, n) = shapes[0], shapes[1]
    if event.name == "mkldnn::_linear_pointwise":  # (x, W (out × in), ...): x · Wᵀ
        n = k2
    elif k != k2:
        return None
    dtypes = getattr(event, "input_dtypes", None) or []
    return m, k, n, str(dtypes[0]) if dtypes else "float"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", required=True)
    parser.add_argument("--task", default="counterfact")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--protocol", default="both", choices=("both", "teacher_forced"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations outside the profiler (median)")
    parser.add_argument("--reps", type=int, default=7, help="timings of each product shape alone (median)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = EvalSetup.load(args.editor, DEFAULT_MODEL, args.task, args.n)
    setup.evaluate(args.protocol, setup.records[:3])  # warm-up: kernel choices timed, caches made
    walls = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        setup.evaluate(args.protocol)
        walls.append(time.perf_counter() - start)
    with profile(record_shapes=True) as prof:
        setup.evaluate(args.protocol)
    calls: dict[tuple[int, int, int, str], list[float]] = collections.defaultdict(list)
    unshaped = 0.0
    for event in prof.events():
        if event.name in PRODUCTS:
            shape = _shape(event)
            if shape is None:
                unshaped += event.cpu_time_total / 1e6
            else:
                calls[shape].append(event.cpu_time_total / 1e6)
    dtypes = {"float": torch.float32, "c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16, "double": torch.float64}
    alone = {shape: _rate(*shape[:3], dtypes.get(shape[3], torch.float32), args.reps) for shape in calls}
    buckets: dict[str, dict[str, float]] = {}
    for (m, k, n, dtype), times in calls.items():
        rows = next((b for b in ROW_BUCKETS if m <= b), max(ROW_BUCKETS) + 1)
        key = f"rows<={rows} {min(k, n)}x{max(k, n)} {dtype}" if rows in ROW_BUCKETS else f"rows>{max(ROW_BUCKETS)} {min(k, n)}x{max(k, n)} {dtype}"
        entry = buckets.setdefault(key, {"calls": 0, "gflop": 0.0, "seconds_in_run": 0.0, "seconds_alone": 0.0})
        entry["calls"] += len(times)
        entry["gflop"] += 2 * m * k * n * len(times) / 1e9
        entry["seconds_in_run"] += sum(times)
        entry["seconds_alone"] += alone[(m, k, n, dtype)] * len(times)
    for entry in buckets.values():
        entry["gflops_in_run"] = entry["gflop"] / entry["seconds_in_run"] if entry["seconds_in_run"] else 0.0
        entry["gflops_alone"] = entry["gflop"] / entry["seconds_alone"] if entry["seconds_alone"] else 0.0
    in_run = sum(e["seconds_in_run"] for e in buckets.values())
    at_rate = sum(e["seconds_alone"] for e in buckets.values())
    gflop = sum(e["gflop"] for e in buckets.values())
    wall = statistics.median(walls)
    n_cases = len(setup.records)
    big = {name: 2 * 2048**3 / _rate(2048, 2048, 2048, dtype, 5) / 1e9 for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "benchmarks/bench_eval_products.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "output"),
        "cpu": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "editor": args.editor,
        "task": args.task,
        "protocol": args.protocol,
        "cases": n_cases,
        "wall_s": wall,
        "wall_all_s": walls,
        "cases_per_s": n_cases / wall,
        "products": {"gflop": gflop, "seconds_in_profiled_run": in_run, "seconds_alone": at_rate,
                     "gflops_in_run": gflop / in_run, "gflops_alone": gflop / at_rate, "unshaped_seconds": unshaped},
        "ceiling": {"wall_s": wall - (in_run - at_rate), "cases_per_s": n_cases / (wall - (in_run - at_rate)),
                    "note": "the evaluation with every product at its isolated rate, all else as measured"},
        "peak_gflops_2048_cubed": big,
        "buckets": dict(sorted(buckets.items(), key=lambda kv: -kv[1]["seconds_in_run"])),
    }
    write_json(args.output, report)
    print({k: report[k] for k in ("cases_per_s", "products", "ceiling", "peak_gflops_2048_cubed")})


if __name__ == "__main__":
    main()
