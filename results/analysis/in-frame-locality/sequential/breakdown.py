"""What 64 sequential edits do to the other questions asked in the edit's frame (README.md's tables), from `evaluate
--sequential`'s reports, generation protocol:

    .venv/bin/python results/analysis/in-frame-locality/sequential/breakdown.py results/analysis/in-frame-locality/sequential/seq64-*.json.gz

Per block of edits: the share of the in-frame questions (wrapped form) whose answer is still the unedited model's, and of
the raw locality prompts. Then: of the wrapped in-frame answers that changed, how many now say an earlier edit's target
and not this case's (the answer starts with it, case-insensitive; this case's target is the report's gen_in_frame_target).
"""
import sys

from instructedit.evaluation.report import load_report_json

BLOCKS = ((0, 8), (8, 16), (16, 32), (32, 64))
for path in sys.argv[1:]:
    report = load_report_json(path)
    name = path.rsplit("/", 1)[-1]
    for lo, hi in BLOCKS:
        frame = [c.gen_post["gen_locality_in_frame"] for c in report.cases[lo:hi] if "gen_locality_in_frame" in c.gen_post]
        raw = [c.gen_post["gen_locality"] for c in report.cases[lo:hi] if "gen_locality" in c.gen_post]
        if frame:
            print(f"{name}: edits {lo + 1}-{hi}: in frame kept {100 * sum(frame) / len(frame):.1f} % (n = {len(frame)}), "
                  f"raw locality kept {100 * sum(raw) / len(raw):.1f} % (n = {len(raw)})")
    targets, changed, earlier = [], 0, 0
    for case in report.cases:
        targets += [a["target"] for a in case.answers if a["family"] != "locality_in_frame"][:1]
        for a in case.answers:
            if a["family"] == "locality_in_frame" and a["form"] == "wrapped" and a["pre"] != a["post"]:
                changed += 1
                own = targets[-1].lower()
                earlier += not a["post"].lower().startswith(own) and any(a["post"].lower().startswith(t.lower()) for t in targets[:-1])
    print(f"{name}: {changed} of {len(report.cases)} wrapped in-frame answers changed; {earlier} now say an earlier edit's target")
