"""Memory and time of many sequential edits kept for rollback through the Python API; writes benchmarks/results/sequential_memory.json.

``--edits N`` CounterFact edits (test split) go through ``InstructEditor.apply_sequential`` on the
default model with a trained MEND editor. Measured: the peak RSS while the N edits are applied and
held, over the RSS of the loaded model (the kernel's high-water mark, reset just before), the time
per edit, and two bitwise checks: ``rollback_to(N // 2)`` gives the weights a separate run of the
first N // 2 edits gave, and ``rollback()`` gives the original weights back.

    .venv/bin/python benchmarks/bench_sequential_memory.py --editor runs/recommended/best [--edits 1000] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import resource
import time
from pathlib import Path

import torch
from torch import nn

from instructedit.api import Edit, InstructEditor, load_editor
from instructedit.io import write_json
from instructedit.models.loading import load_model
from instructedit.tasks.splits import load_task_splits

from common import add_common_arguments, rss_bytes  # benchmarks/common.py

logger = logging.getLogger("bench_sequential_memory")
RESULTS = Path(__file__).resolve().parent / "results" / "sequential_memory.json"
GIB = 1024**3


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def edited_weights(model: nn.Module, editor: InstructEditor) -> dict[str, torch.Tensor]:
    return {w.name: model.get_parameter(w.name).detach().clone() for w in editor.editor.weights}


def same(model: nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(model.get_parameter(name), value) for name, value in reference.items())


def all_weights_same(model: nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, reference[name]) for name, value in model.state_dict().items())


def counterfact_edits(n: int, data_dir: str | None, seed: int) -> list[Edit]:
    """``n`` edits from the CounterFact splits (test first), cycled if the data holds fewer records."""
    splits = load_task_splits("counterfact", data_dir, seed=seed)
    records = splits.test + splits.val + splits.train
    return [Edit(r.prompt, r.target_new, task=r.task, subject=r.subject) for r in (records[i % len(records)] for i in range(n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", required=True, help="a trained MEND editor folder (e.g. runs/recommended/best); only read")
    parser.add_argument("--edits", type=int, default=1000, help="sequential edits to apply and hold")
    add_common_arguments(parser, RESULTS)
    args = parser.parse_args()
    if args.edits < 2:
        parser.error("--edits must be >= 2 (the middle rollback needs a middle)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    editor = load_editor(args.editor)
    edits = counterfact_edits(args.edits, args.data_dir, args.seed)
    middle = args.edits // 2
    original = {k: v.clone() for k, v in model.state_dict().items()}

    start = time.perf_counter()
    with editor.apply_sequential(model, edits[:middle], tok):
        at_middle = edited_weights(model, editor)
    reference_s = time.perf_counter() - start
    logger.info("reference run of %d edits: %.1f s", middle, reference_s)

    rss_loaded = rss_bytes()
    hwm_reset = reset_peak_rss()
    start = time.perf_counter()
    edited = editor.apply_sequential(model, edits, tok)
    edits_s = time.perf_counter() - start
    peak = rss_bytes("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logger.info("%d sequential edits: %.1f s, peak RSS %.2f GiB (%.3f GiB over the loaded model)", args.edits, edits_s,
                peak / GIB, (peak - rss_loaded) / GIB)

    start = time.perf_counter()
    edited.rollback_to(middle)
    middle_s = time.perf_counter() - start
    middle_ok = same(model, at_middle)
    start = time.perf_counter()
    edited.rollback()
    all_s = time.perf_counter() - start
    all_ok = all_weights_same(model, original)
    # All at once from the end too, without the middle step in between.
    with editor.apply_sequential(model, edits[: min(args.edits, 20)], tok):
        pass
    all_from_end_ok = all_weights_same(model, original)

    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": args.model,
        "editor": str(args.editor),
        "edited_weights": len(editor.editor.weights),
        "edited_weight_bytes": sum(v.nbytes for v in at_middle.values()),
        "edits": args.edits,
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "rss_loaded_gib": rss_loaded / GIB,
        "peak_rss_gib": peak / GIB,
        "peak_rss_over_loaded_gib": (peak - rss_loaded) / GIB,
        "peak_from": "VmHWM reset before the edits" if hwm_reset else "ru_maxrss (whole process)",
        "edits_s": edits_s,
        "s_per_edit": edits_s / args.edits,
        "rollback_to_middle_s": middle_s,
        "rollback_all_s": all_s,
        "reference_middle_run_s": reference_s,
        "rollback_to_middle_bitwise": middle_ok,
        "rollback_all_bitwise": all_ok,
        "rollback_all_from_the_end_bitwise": all_from_end_ok,
    }
    write_json(args.output, report)
    print({k: report[k] for k in ("edits", "peak_rss_over_loaded_gib", "s_per_edit", "rollback_to_middle_bitwise", "rollback_all_bitwise")})
    if not (middle_ok and all_ok and all_from_end_ok):
        raise SystemExit("rollback was not bitwise")


if __name__ == "__main__":
    main()
