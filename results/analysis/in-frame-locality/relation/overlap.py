"""Which other questions asked in the edit's frame change: the evaluation's in-frame locality split by how much of the
edit question's relation wording the other question shares.

Each held-out ZsRE case of an ``evaluate`` report asks the next record's question wrapped in the edit's frame
(``locality_in_frame``, wrapped form). Here both questions lose their subject and the words every question has; the
relation-word overlap is the Jaccard index of what is left ("What is the father of S?" and "Who was the father of S?":
father). Per overlap band: how often that answer changed, and how often it is now the edit's target (generation).

    .venv/bin/python results/analysis/in-frame-locality/relation/overlap.py results/analysis/in-frame-locality/eval-zsre300-*.json.gz
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from instructedit.evaluation.generation import bootstrap_ci, exact_match, same_answer
from instructedit.evaluation.report import load_report_json

DATA = Path(__file__).resolve().parents[4].parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.json"
COMMON = {"s", "the", "of", "is", "a", "an", "what", "which", "who", "was", "were", "did", "does", "do", "in", "to", "by", "for"}
BANDS = ((0.0, 0.2), (0.2, 0.5), (0.5, 1.01))


def relation_words(question: str, subject: str) -> set[str]:
    text = question.replace(subject, " ") if subject and subject in question else question
    return set(re.sub(r"[^\w ]", " ", text.lower()).split()) - COMMON


def main(paths: list[str]) -> int:
    records = json.loads(DATA.read_text())
    subject_of = {r["src"]: r["subject"] for r in records}
    for path in paths:
        report = load_report_json(path)
        rows = []
        for case in report.cases:
            own = records[int(case.source.split("#")[1])]
            other = next(a for a in case.answers if a["family"] == "locality_in_frame" and a["form"] == "wrapped")
            mine, theirs = relation_words(own["src"], own["subject"]), relation_words(other["question"], subject_of.get(other["question"], ""))
            overlap = len(mine & theirs) / max(1, len(mine | theirs))
            rows.append((overlap, float(not same_answer(other["post"], other["pre"])), exact_match(other["post"], other["target"])))
        for low, high in BANDS:
            band = [r for r in rows if low <= r[0] < high]
            if band:
                changed, target = bootstrap_ci([r[1] for r in band]), bootstrap_ci([r[2] for r in band])
                print(f"{Path(path).name}: relation-word overlap [{low:g}, {min(high, 1):g}{']' if high > 1 else ')'}: n = {len(band)}, "
                      f"changed {100 * changed.mean:.1f} [{100 * changed.low:.1f}, {100 * changed.high:.1f}] %, "
                      f"says the edit's target {100 * target.mean:.1f} [{100 * target.low:.1f}, {100 * target.high:.1f}] %")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
