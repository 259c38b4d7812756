"""Same-relation questions asked in the edit's frame: does holding subject-swapped neighbours still at edit time keep them?

For each held-out ZsRE edit (the question of record i with its new answer ``alt``), the edit's question with its subject
replaced by other subjects (of ZsRE's training file) makes same-relation questions. ``--held`` of them, wrapped in the
edit's instruction frame and continued with what the unedited model says, join the editor's own preservation sample in
that edit's solves at ``--weights`` tokens (0: the editor as it is, no neighbours). ``--probes`` other swaps (subjects
never held) measure what the edit does to same-relation questions in its frame. Also measured per edit: whether the
edited model says the target (the wrapped question and its rephrase), the next record's question asked in the frame
(the evaluation's in-frame locality) and the record's raw NQ locality question. Generation: greedy, first line.

    OMP_NUM_THREADS=2 .venv/bin/python results/analysis/in-frame-locality/relation/neighbours.py \
        --editor runs/ls8-answer/calibrated-r4-in-frame-wide --n 100 --weights 0,1000,4000 --output OUT.json

The neighbours are made by the library (``InstructEditor.apply(neighbours=Neighbours(...))``, ``editors/neighbours.py``):
``--subjects editor`` swaps in the pool saved with the editor (its training split's subjects), a file another pool
(ZsRE's training file: the study's first runs). The probes' subjects always come from ``--probe-subjects`` (ZsRE's
training file), never one held.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import instructedit
from instructedit import Edit, Neighbours
from instructedit.editors.neighbours import read_subjects, swapped_questions
from instructedit.evaluation.generation import bootstrap_ci, exact_match, first_line, greedy_generate, same_answer
from instructedit.io import write_json

DATA = Path(__file__).resolve().parents[4].parent / "shared" / "data" / "zsre"
BUDGET = 16  # new tokens per answer, every question alike


def says(model, tok, prompts: list[str]) -> list[str]:
    return [first_line(text) for text in greedy_generate(model, tok, prompts, BUDGET)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--editor", required=True)
    parser.add_argument("--n", type=int, default=100, help="held-out ZsRE records 0..n-1 (those whose question names the subject)")
    parser.add_argument("--held", type=int, default=8, help="subject-swapped neighbours held still per edit")
    parser.add_argument("--probes", type=int, default=4, help="other subject swaps asked after the edit (never held)")
    parser.add_argument("--weights", default="0,1000,4000", help="the neighbours' weight in tokens; 0: none (the editor as it is)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of each edit made with neighbours (default: apply's auto, twice the editor's calibrated edit_rounds)")
    parser.add_argument("--subjects", default="editor", help="the pool the neighbours are drawn from: 'editor' (saved with it) or a file")
    parser.add_argument("--probe-subjects", default=str(DATA / "zsre_mend_train-1k.json"), help="the pool the probes are drawn from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    weights = [float(w) for w in args.weights.split(",")]
    torch.manual_seed(args.seed)

    test = json.loads((DATA / "zsre_mend_eval_portability_gpt4.json").read_text())
    editor = instructedit.load_editor(args.editor)
    pool = editor.subjects if args.subjects == "editor" else read_subjects(args.subjects)
    if pool is None:
        raise SystemExit(f"{args.editor} has no subject pool saved with it: give --subjects FILE")
    probe_pool = read_subjects(args.probe_subjects)
    model, tok = instructedit.load_model(editor.model_name)
    cases, start = [], time.perf_counter()
    for i, record in enumerate(test[: args.n]):
        question, subject = record["src"], record["subject"]
        if not subject or subject not in question or i + 1 >= len(test):
            continue
        edit = Edit(prompt=question, target=record["alt"], task="zsre", subject=subject)
        frame = lambda q: editor.wrap(edit, q)  # noqa: E731
        held = set(swapped_questions(question, subject, pool, args.held, args.seed))  # what apply(neighbours=...) holds
        others = [s for s in probe_pool if question.replace(subject, s) not in held]
        probes = [frame(q) for q in swapped_questions(question, subject, others, args.probes, args.seed + 1)]
        asked = [frame(question), frame(record["rephrase"]), *probes, frame(test[i + 1]["src"]), record["loc"]]
        before = says(model, tok, asked)
        case = {"index": i, "question": question, "target": record["alt"], "probes": probes, "before": before, "after": {}}
        for weight in weights:
            neighbours = Neighbours(args.held, weight, pool, args.seed) if weight else None
            with editor.apply(model, [edit], tok, rounds=(args.rounds or "auto") if weight else "auto", neighbours=neighbours) as edited:
                after = says(edited.model, tok, asked)
            n = len(probes)
            case["after"][f"{weight:g}"] = {
                "answers": after,
                "said": exact_match(after[0], record["alt"]), "rephrase_said": exact_match(after[1], record["alt"]),
                "same_relation_kept": sum(same_answer(a, b) for a, b in zip(after[2 : 2 + n], before[2 : 2 + n])) / n,
                "same_relation_says_target": sum(exact_match(a, record["alt"]) for a in after[2 : 2 + n]) / n,
                "next_question_in_frame_kept": float(same_answer(after[2 + n], before[2 + n])),
                "raw_locality_kept": float(same_answer(after[3 + n], before[3 + n]))}
        cases.append(case)
        print(f"{len(cases)} cases, {time.perf_counter() - start:.0f} s: "
              + "; ".join(f"w {w}: said {v['said']:.0f} same-relation kept {v['same_relation_kept']:.2f}" for w, v in case["after"].items()),
              file=sys.stderr, flush=True)
    summary = {}
    for weight in case["after"]:
        summary[weight] = {}
        for key in ("said", "rephrase_said", "same_relation_kept", "same_relation_says_target", "next_question_in_frame_kept",
                    "raw_locality_kept"):
            values = [c["after"][weight][key] for c in cases]
            ci = bootstrap_ci(values)
            summary[weight][key] = {"mean": ci.mean, "ci95": [ci.low, ci.high], "n": ci.n}
            if weight != "0" and "0" in case["after"]:  # paired with the editor as it is, case by case
                diff = bootstrap_ci([c["after"][weight][key] - c["after"]["0"][key] for c in cases])
                summary[weight][key]["minus_none"] = {"mean": diff.mean, "ci95": [diff.low, diff.high]}
    write_json(args.output, {"command": " ".join(sys.argv), "editor": args.editor, "protocol": "generation (greedy, first line)",
                             "subjects": args.subjects, "subject_pool_size": len(pool), "probe_subjects": args.probe_subjects,
                             "rounds_with_neighbours": args.rounds or 2 * editor.edit_rounds, "held": args.held, "probes": args.probes, "budget": BUDGET, "summary": summary, "cases": cases})
    for weight, scores in summary.items():
        print(f"weight {weight}: " + ", ".join(f"{k} {v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" for k, v in scores.items())
              + f" (n = {scores['said']['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
