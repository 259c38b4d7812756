"""Which locality questions a 256-edit call changes: runs ``instructedit analyze batch`` with the arguments given after
``--`` and records, per locality question of the N-edit call, the question, the unedited model's answer and the edited
one (JSONL beside ``--output``: FILE.flips.jsonl), then prints how the changed ones differ from the kept ones. Only
reading: the study itself runs unchanged (its JSON is written as usual).

    OMP_NUM_THREADS=2 .venv/bin/python results/analysis/ls-keys/rounds/sample/flips.py -- analyze batch ... --output FILE.json
"""

import json
import statistics
import sys
from pathlib import Path

from instructedit.analysis import many_edits
from instructedit.cli import main
from instructedit.evaluation.generation import first_line, same_answer

args = sys.argv[sys.argv.index("--") + 1 :]
output = Path(args[args.index("--output") + 1])
rows: list[dict] = []
scores = many_edits.answer_scores


def recording(queries, answers, reference=None):
    if reference is not None and len(queries) == len(answers):
        for q, a, b in zip(queries, answers, reference):
            if q.family == "locality":
                rows.append({"question": q.prompt, "gold": q.target, "before": first_line(b), "after": first_line(a),
                             "kept": bool(same_answer(first_line(a), b))})
    return scores(queries, answers, reference)


many_edits.answer_scores = recording
code = main(args)
path = output.with_suffix(".flips.jsonl")
path.write_text("".join(json.dumps(r) + "\n" for r in rows))
changed = [r for r in rows if not r["kept"]]
kept = [r for r in rows if r["kept"]]
print(f"{len(rows)} locality questions, {len(changed)} answered otherwise after the call ({path})")
for name, group in (("changed", changed), ("kept", kept)):
    if group:
        words = statistics.mean(len(r["before"].split()) for r in group)
        q_mark = sum(r["before"].strip() in ("", "?") for r in group) / len(group)
        print(f"  {name}: {len(group)}, pre-edit answer {words:.1f} words on average, {100 * q_mark:.0f} % empty or '?'")
for r in changed[:40]:
    print(f"  {r['question'][:60]!r}: {r['before'][:40]!r} -> {r['after'][:40]!r}")
sys.exit(code)
