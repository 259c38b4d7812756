"""The held-out table of README.md from evaluate's reports (generation protocol, 95 % bootstrap intervals):

    .venv/bin/python results/analysis/in-frame-locality/table.py results/analysis/in-frame-locality/eval-*.json.gz
"""
import sys

from instructedit.evaluation.report import load_report_json

KEYS = [("gen_reliability", "said"), ("gen_generalization", "rephrase said"), ("gen_locality", "raw locality kept"),
        ("gen_locality_in_frame", "in frame kept"), ("gen_in_frame_target", "in frame saying the target"),
        ("gen_locality_in_frame_plain", "in frame, bare, kept"), ("gen_portability", "portability said")]
print("| report | task | n | " + " | ".join(label for _, label in KEYS) + " |")
print("|---|---|---|" + "---|" * len(KEYS))
for path in sys.argv[1:]:
    report = load_report_json(path)
    for task, phases in report.aggregates.items():
        post = phases.get("gen_post", {})
        cells = [f"{100 * post[k].mean:.1f} [{100 * post[k].low:.1f}, {100 * post[k].high:.1f}]" if k in post else "–" for k, _ in KEYS]
        n = post["gen_reliability"].n if "gen_reliability" in post else 0
        print(f"| {path.rsplit('/', 1)[-1]} | {task} | {n} | " + " | ".join(cells) + " |")

# paired: each later report against the first of the same task, case by case (the same records in the same order)
from instructedit.evaluation.generation import bootstrap_ci  # noqa: E402

first = {}
for path in sys.argv[1:]:
    report = load_report_json(path)
    task = next(iter(report.aggregates))
    if task not in first:
        first[task] = (path, report)
        continue
    base_path, base = first[task]
    assert [c.source for c in base.cases] == [c.source for c in report.cases], "paired reports must hold the same cases"
    diffs = []
    for key, label in KEYS[:5]:
        pairs = [(b.gen_post[key], c.gen_post[key]) for b, c in zip(base.cases, report.cases) if key in b.gen_post and key in c.gen_post]
        if pairs:
            ci = bootstrap_ci([c - b for b, c in pairs])
            diffs.append(f"{label} {100 * ci.mean:+.1f} [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}] (n = {len(pairs)})")
    print(f"{path.rsplit('/', 1)[-1]} − {base_path.rsplit('/', 1)[-1]}, paired by case, points: " + "; ".join(diffs))
