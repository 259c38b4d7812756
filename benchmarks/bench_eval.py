"""Throughput of the batched evaluation runner against a naive one-prompt-at-a-time loop, and of its two protocols, in one process.

The naive loop does what the published reference implementation does: every probe is its own
forward pass with logits at every position, before and after the edit, then the edit is undone.
Both score the same probes with the same metric definitions; the script checks that they agree.
Beside it, the runner's cost of the generation protocol: the same cases with ``protocol=
"teacher_forced"`` and ``protocol="both"``, interleaved repetitions (``protocols`` in the JSON).

    .venv/bin/python benchmarks/bench_eval.py [--editor DIR] [--n 30] [--repeats 2] [--threads 1] [--no-naive]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructedit.config import DEFAULT_MODEL, load_config
from instructedit.editors.base import Editor
from instructedit.editors.mend import MENDEditor
from instructedit.editors.registry import build_editor
from instructedit.evaluation import before_after
from instructedit.evaluation.fast_linears import FAST_KERNELS_ENV
from instructedit.evaluation.greedy_head import BF16_HEAD_ENV, bf16_head_wanted
from instructedit.evaluation.metrics import aggregate, family_means
from instructedit.evaluation.probes import SCORED, case_probes
from instructedit.evaluation.runner import evaluate
from instructedit.io import write_json
from instructedit.models.loading import load_model
from instructedit.records import EditRecord, TokenBatch
from instructedit.tasks.collate import Collator
from instructedit.tasks.instructions import InstructionPool
from instructedit.tasks.splits import load_task_splits

from common import cpu_name, trained_queries  # benchmarks/common.py

logger = logging.getLogger("bench_eval")
RESULTS = Path(__file__).resolve().parent / "results" / "eval.json"


@torch.no_grad()
def _full_logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """One probe, the reference way: a full forward with logits at every position, then the answer positions."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (1, seq, vocab)
    return logits[batch.label_mask]


def naive_evaluate(model: nn.Module, tokenizer, editor: Editor, records: Sequence[EditRecord], pool: InstructionPool,
                   instruction: int | None) -> list[tuple[str, dict[str, float]]]:
    """Per case: each probe tokenized and run alone, pre and post edit; returns (task, post metrics) per case."""
    collator = Collator(tokenizer, 1024, pool)
    results = []
    for record in records:
        probes = case_probes(collator, record, instruction)
        batches = [collator.qa_batch([(p.prompt, p.answer)]) for p in probes]
        pre = [_full_logits(model, b) for b in batches]
        handle = editor.apply(model, collator.qa_batch(collator.edit_pairs(record, instruction)))
        try:
            post = [_full_logits(model, b) for b in batches]
        finally:
            handle.rollback()
        acc, same = [], []
        for b, lp, lq in zip(batches, pre, post):
            targets = b.labels[b.label_mask]
            acc.append((lq.argmax(-1) == targets).float().mean().item())
            same.append((lq.argmax(-1) == lp.argmax(-1)).float().mean().item())
        scored = [i for i, p in enumerate(probes) if p.family in SCORED]
        local = [i for i, p in enumerate(probes) if p.family == "locality"]
        metrics = family_means([acc[i] for i in scored], [probes[i].family for i in scored], [probes[i].kind for i in scored])
        metrics |= family_means([same[i] for i in local], ["locality"] * len(local), [probes[i].kind for i in local])
        results.append((record.task, metrics))
    return results


@dataclass
class EvalSetup:
    """The model, an editor (trained, or a fresh untrained MEND), the first test cases of a task, and how to ask them."""

    model: nn.Module
    tokenizer: Any
    editor: Editor
    records: list[EditRecord]
    pool: InstructionPool
    instruction: int | None
    made: dict  # the editor's edit settings (answer stop, edit forms, rounds), as it was trained and calibrated

    @classmethod
    def load(cls, editor_dir: str | None, model_name: str, task: str, n: int) -> "EvalSetup":
        model, tokenizer = load_model(model_name)
        editor = MENDEditor.from_pretrained(editor_dir) if editor_dir else build_editor(model, load_config(None, [f"model.name={model_name}"]))
        editor.eval()
        records = load_task_splits(task).test[:n]
        pool, made = trained_queries(editor_dir)  # asked as the editor was trained: its template, answer stop and edit forms
        return cls(model, tokenizer, editor, records, pool, pool.evaluation_index("seen"), made)

    def evaluate(self, protocol: str = "teacher_forced", records: Sequence[EditRecord] | None = None, in_frame: bool = True):
        """The runner's report of ``records`` (default: all of them) under ``protocol`` (``in_frame``: with in-frame locality)."""
        return evaluate(self.model, self.tokenizer, self.editor, self.records if records is None else records, self.pool,
                        self.instruction, progress=False, protocol=protocol, in_frame=in_frame, **self.made)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", default=None, help="a trained editor folder (default: a fresh, untrained MEND)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="counterfact")
    parser.add_argument("--n", type=int, default=30, help="test cases")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each, alternating")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads spin against other processes)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive loop: only teacher-forced vs both protocols")
    parser.add_argument("--without-in-frame-too", action="store_true",
                        help="also time both protocols without the in-frame locality questions (evaluate --no-in-frame), "
                             "interleaved: what they add (before 2026-12-07 the generation protocol did not ask them)")
    parser.add_argument("--unshared-prompts-too", action="store_true",
                        help="also time both protocols with every prompt prefilled and answered unedited on its own row, as "
                             "before 2026-12-07 (before_after._same_prompts: one row per prompt), interleaved: what sharing "
                             "the rows of a prompt asked under several edits (the in-frame questions) saves")
    parser.add_argument("--float32-head-too", action="store_true",
                        help="also time both protocols with greedy decoding's vocabulary projection in float32 "
                             "($INSTRUCTEDIT_BF16_HEAD=0), interleaved: what the bfloat16 head saves")
    parser.add_argument("--plain-kernels-too", action="store_true",
                        help="also time both protocols and the teacher-forced one with BLAS linears and PyTorch's fused attention only "
                             "($INSTRUCTEDIT_FAST_KERNELS=0), interleaved: what fast_linears and decode_attention save")
    parser.add_argument("--bfloat16-too", action="store_true",
                        help="also time both protocols and the teacher-forced one on the model loaded in bfloat16 (evaluate "
                             "--dtype bfloat16), interleaved: what half precision saves on this CPU, and how many answers it changes")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    setup = EvalSetup.load(args.editor, args.model, args.task, args.n)
    model, tokenizer, editor, records, pool, instruction, made = (setup.model, setup.tokenizer, setup.editor, setup.records,
                                                                  setup.pool, setup.instruction, setup.made)
    if made["edit_rounds"] != 1 and not args.no_naive:
        parser.error(f"{args.editor} makes each edit in {made['edit_rounds']} rounds; the naive loop makes one: pass --no-naive")

    def timed(run):  # wall-clock and this process's CPU time: on a shared machine the latter is the steadier one
        wall, cpu = time.perf_counter(), time.process_time()
        out = run()
        return time.perf_counter() - wall, time.process_time() - cpu, out

    def batched(protocol: str = "teacher_forced") -> tuple[float, float, object]:
        return timed(lambda: setup.evaluate(protocol))

    def naive() -> tuple[float, float, list]:
        return timed(lambda: naive_evaluate(model, tokenizer, editor, records, pool, instruction))

    half = replace(setup, model=load_model(args.model, dtype="bfloat16")[0]) if args.bfloat16_too else None
    logger.info("warm-up")
    setup.evaluate("both", records[:3])
    if half is not None:
        half.evaluate("both", records[:3])
    if not args.no_naive:
        naive_evaluate(model, tokenizer, editor, records[:3], pool, instruction)
    times: dict[str, list[float]] = {"batched": [], "naive": [], "batched_cpu": [], "naive_cpu": [], "both": [], "both_cpu": []}
    loads: list[float] = []
    naive_results: list | None = None
    for r in range(args.repeats):  # interleaved: teacher-forced, both protocols, naive, then again
        wall, cpu, report = batched()
        times["batched"].append(wall), times["batched_cpu"].append(cpu)
        wall, cpu, both = batched("both")
        times["both"].append(wall), times["both_cpu"].append(cpu)
        if args.without_in_frame_too:
            wall, cpu, _ = timed(lambda: setup.evaluate("both", in_frame=False))
            times.setdefault("both_without_in_frame", []).append(wall), times.setdefault("both_without_in_frame_cpu", []).append(cpu)
        if args.unshared_prompts_too:
            with unshared_prompts():
                wall, cpu, apart = batched("both")
            times.setdefault("both_unshared_prompts", []).append(wall), times.setdefault("both_unshared_prompts_cpu", []).append(cpu)
            times.setdefault("unshared_prompts_same_answers", []).append(answers(apart) == answers(both))
            times.setdefault("generation_s_unshared_prompts", []).append(apart.timing["generation_before_after_s"])
            times.setdefault("generation_s_shared_prompts", []).append(both.timing["generation_before_after_s"])
        if args.float32_head_too:
            with float32_head():
                wall, cpu, both32 = batched("both")
            times.setdefault("both_float32_head", []).append(wall), times.setdefault("both_float32_head_cpu", []).append(cpu)
            if answers(both32) != answers(both):
                raise RuntimeError("the float32 and the bfloat16 head gave different answers")
        if args.plain_kernels_too:
            with switched(FAST_KERNELS_ENV, "0"):
                for key, protocol in (("batched_plain_kernels", "teacher_forced"), ("both_plain_kernels", "both")):
                    wall, cpu, plain = batched(protocol)
                    times.setdefault(key, []).append(wall), times.setdefault(f"{key}_cpu", []).append(cpu)
            if answers(plain) != answers(both):
                logger.warning("the plain kernels gave other answers than the fast ones (float rounding at a near tie)")
            times.setdefault("plain_kernels_same_answers", []).append(answers(plain) == answers(both))
        if half is not None:
            for key, protocol in (("batched_bfloat16", "teacher_forced"), ("both_bfloat16", "both")):
                wall, cpu, halved = timed(lambda: half.evaluate(protocol))
                times.setdefault(key, []).append(wall), times.setdefault(f"{key}_cpu", []).append(cpu)
            pairs = zip((x for case in answers(halved) for x in case), (x for case in answers(both) for x in case))
            times["bfloat16_answers_differing"] = [sum(a != b for a, b in pairs)]  # (before, after) answer pairs
        if not args.no_naive:
            wall, cpu, naive_results = naive()
            times["naive"].append(wall), times["naive_cpu"].append(cpu)
        loads.append(os.getloadavg()[0])
        logger.info("repeat %d: teacher-forced %.1f s (cpu %.1f s), both protocols %.1f s (cpu %.1f s), naive %s, load %.1f", r + 1,
                    times["batched"][-1], times["batched_cpu"][-1], times["both"][-1], times["both_cpu"][-1],
                    f"{times['naive'][-1]:.1f} s" if times["naive"] else "skipped", loads[-1])
        # Written after every repeat: on a busy machine a long run may be cut short.
        result = summarize(args, model, tokenizer, records, pool, instruction, report, naive_results, times, loads)
        result["protocols"] = protocol_summary(report, both, times)
        write_json(args.output, result)
    n, protocols = result["n_cases"], result["protocols"]
    if not args.no_naive:
        print(f"{n} cases: batched {result['batched']['cases_per_s']:.3f} cases/s, "
              f"naive {result['naive']['cases_per_s']:.3f} cases/s, speedup {result['speedup']:.2f}x "
              f"(CPU time: {result['speedup_cpu']:.2f}x)")
    print(f"{n} cases: teacher-forced {protocols['teacher_forced']['cases_per_s']:.3f} cases/s, both protocols "
          f"{protocols['both']['cases_per_s']:.3f} cases/s ({protocols['cost_of_generation']:.2f}x the time)")
    print(f"wrote {args.output}")
    return 0


@contextlib.contextmanager
def unshared_prompts() -> Iterator[None]:
    """Within the block, ``greedy_before_after`` prefills and answers unedited every prompt on a row of its own."""
    shared = before_after._same_prompts
    before_after._same_prompts = lambda encoded, seeded: {i: [i] for i in range(len(encoded))}
    try:
        yield
    finally:
        before_after._same_prompts = shared


def float32_head() -> contextlib.AbstractContextManager:
    """Greedy decoding projects onto the vocabulary in float32 within the block (``greedy_head``)."""
    return switched(BF16_HEAD_ENV, "0")


@contextlib.contextmanager
def switched(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` within the block."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def answers(report) -> list:
    return [[(a["pre_text"], a["post_text"]) for a in case.answers] for case in report.cases]


def protocol_summary(tf_report, both_report, times: dict[str, list[float]]) -> dict:
    """Cases/s of the teacher-forced protocol alone and of both protocols, on the same cases, and where the extra time goes."""
    n = len(tf_report.cases)
    tf_s, both_s = statistics.median(times["batched"]), statistics.median(times["both"])
    gen_post = next(iter(both_report.aggregates.values())).get("gen_post", {})
    return {
        "teacher_forced": {"seconds": times["batched"], "cpu_seconds": times["batched_cpu"], "cases_per_s": n / tf_s},
        "both": {"seconds": times["both"], "cpu_seconds": times["both_cpu"], "cases_per_s": n / both_s,
                 "generation_seconds_last_run": {k: v for k, v in both_report.timing.items() if k.startswith("generation_")},
                 "queries": sum(len(c.answers) for c in both_report.cases)},
        "cost_of_generation": both_s / tf_s,
        "cost_per_repeat": [b / t for b, t in zip(times["both"], times["batched"])],
        "bf16_head": bf16_head_wanted(),  # greedy decoding's vocabulary projection in bfloat16 (greedy_head), this host
        **({"both_without_in_frame": {"seconds": times["both_without_in_frame"], "cpu_seconds": times["both_without_in_frame_cpu"],
                                      "cases_per_s": n / statistics.median(times["both_without_in_frame"]),
                                      "cost_of_generation": statistics.median(times["both_without_in_frame"]) / tf_s,
                                      "in_frame_adds": both_s / statistics.median(times["both_without_in_frame"]) - 1}}
           if "both_without_in_frame" in times else {}),
        **({"both_unshared_prompts": {"seconds": times["both_unshared_prompts"], "cpu_seconds": times["both_unshared_prompts_cpu"],
                                      "cases_per_s": n / statistics.median(times["both_unshared_prompts"]),
                                      "shared_over_unshared": both_s / statistics.median(times["both_unshared_prompts"]),
                                      "shared_over_unshared_per_repeat": [a / b for a, b in zip(times["both"], times["both_unshared_prompts"])],
                                      "generation_seconds": times["generation_s_unshared_prompts"],
                                      "generation_seconds_shared": times["generation_s_shared_prompts"],
                                      "same_answers": all(times["unshared_prompts_same_answers"])}}
           if "both_unshared_prompts" in times else {}),
        **({"both_float32_head": {"seconds": times["both_float32_head"], "cpu_seconds": times["both_float32_head_cpu"],
                                  "cases_per_s": n / statistics.median(times["both_float32_head"]),
                                  "cost_of_generation": statistics.median(times["both_float32_head"]) / tf_s,
                                  "same_answers": True}}
           if "both_float32_head" in times else {}),
        **({"plain_kernels": {"teacher_forced_seconds": times["batched_plain_kernels"], "both_seconds": times["both_plain_kernels"],
                              "cost_of_generation": statistics.median(times["both_plain_kernels"]) / statistics.median(times["batched_plain_kernels"]),
                              "both_over_fast": statistics.median(times["both_plain_kernels"]) / both_s,
                              "teacher_forced_over_fast": statistics.median(times["batched_plain_kernels"]) / tf_s,
                              "same_answers": all(times["plain_kernels_same_answers"])}}
           if "both_plain_kernels" in times else {}),
        **({"bfloat16": {"teacher_forced_seconds": times["batched_bfloat16"], "both_seconds": times["both_bfloat16"],
                         "teacher_forced_cases_per_s": n / statistics.median(times["batched_bfloat16"]),
                         "both_cases_per_s": n / statistics.median(times["both_bfloat16"]),
                         "cost_of_generation": statistics.median(times["both_bfloat16"]) / statistics.median(times["batched_bfloat16"]),
                         "both_over_float32": statistics.median(times["both_bfloat16"]) / both_s,
                         "teacher_forced_over_float32": statistics.median(times["batched_bfloat16"]) / tf_s,
                         "answer_pairs_differing_from_float32": times["bfloat16_answers_differing"][0],  # last repeat's
                         "answer_pairs": sum(len(c.answers) for c in both_report.cases)}}
           if "both_bfloat16" in times else {}),
        "post_edit_generation": {k: s.mean for k, s in gen_post.items() if "/" not in k},
    }


def summarize(args: argparse.Namespace, model: nn.Module, tokenizer, records: Sequence[EditRecord], pool: InstructionPool,
              instruction: int, report, naive_results: list | None, times: dict[str, list[float]], loads: list[float]) -> dict:
    n = len(report.cases)
    batched_s, batched_cpu = statistics.median(times["batched"]), statistics.median(times["batched_cpu"])
    collator = Collator(tokenizer, 1024, pool)
    common = {
        "benchmark": "evaluation throughput: batched runner (teacher-forced) vs one prompt at a time (pre + post edit, rollback); "
                     "teacher-forced vs both protocols",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "editor": args.editor or "fresh untrained MEND (build_editor, default config)",
        "task": args.task, "n_cases": n,
        "probes_per_case": statistics.mean(len(case_probes(collator, r, instruction)) for r in records),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "device": str(next(model.parameters()).device), "platform": platform.platform(), "cpu": cpu_name(),
        "load_average_1min": loads, "repeats_done": len(times["batched"]),
        "batched": {"seconds": times["batched"], "cpu_seconds": times["batched_cpu"], "cases_per_s": n / batched_s,
                    "cases_per_cpu_s": n / batched_cpu, "fast_path": report.settings.fast_path, "packed_rows": report.settings.packed_rows,
                    "protocol": report.settings.protocol},
        "answer_stop": report.settings.answer_stop, "edit_forms": report.settings.edit_forms, "edit_rounds": report.settings.edit_rounds,
    }
    if naive_results is None:
        return common
    ours = report.aggregates[args.task]["post"]
    theirs = aggregate(naive_results)[args.task]
    naive_s, naive_cpu = statistics.median(times["naive"]), statistics.median(times["naive_cpu"])
    return common | {
        "naive": {"seconds": times["naive"], "cpu_seconds": times["naive_cpu"], "cases_per_s": n / naive_s, "cases_per_cpu_s": n / naive_cpu},
        "speedup": naive_s / batched_s,
        "speedup_cpu": naive_cpu / batched_cpu,
        "speedup_per_repeat": [a / b for a, b in zip(times["naive"], times["batched"])],
        "agreement_post_edit": {k: {"batched": ours[k].mean, "naive": theirs[k].mean} for k in ours if k in theirs},
    }

if __name__ == "__main__":
    raise SystemExit(main())
