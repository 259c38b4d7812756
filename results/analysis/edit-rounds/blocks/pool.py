"""One 256-edit call measured on four disjoint blocks of ZsRE's held-out file, pooled (n = 1,024 edits).

Reads ``heldout-<start>.json`` (``instructedit analyze batch --start <start> --sizes 256 ...``, the command in each file) and
writes ``pooled.json``. Generation outcomes are 0/1 per case (exact match; a locality answer kept or not), so their pooled
counts are exact and their interval is the project's percentile bootstrap over the 1,024 outcomes (``bootstrap_ci``,
fixed seed). Teacher-forced scores are per-case token shares that the block files keep only as means and intervals:
their pooled mean is the mean of the four block means (equal n), their interval a normal one from the blocks'
standard errors (each block's bootstrap interval width / 3.92), labelled as such.

    .venv/bin/python results/analysis/edit-rounds/blocks/pool.py
"""

import json
import math
from pathlib import Path

from instructedit.evaluation.generation import bootstrap_ci

HERE = Path(__file__).resolve().parent
METRICS = ("reliability", "generalization", "locality", "gen_reliability", "gen_generalization", "gen_locality")


def pooled(summaries: list[dict]) -> dict:
    """One metric over the blocks: exact counts and a bootstrap for 0/1 outcomes, else the mean and a normal interval."""
    n = sum(s["n"] for s in summaries)
    counts = [s["mean"] * s["n"] for s in summaries]
    if summaries[0]["protocol"] == "generation" and all(abs(c - round(c)) < 1e-6 for c in counts):
        hits = sum(round(c) for c in counts)
        ci = bootstrap_ci([1.0] * hits + [0.0] * (n - hits))
        return {"mean": hits / n, "ci_low": ci.low, "ci_high": ci.high, "n": n, "count": hits, "protocol": "generation",
                "interval": "percentile bootstrap over the pooled 0/1 outcomes"}
    mean = sum(c for c in counts) / n
    se = math.sqrt(sum(((s["ci_high"] - s["ci_low"]) / 3.92 * s["n"] / n) ** 2 for s in summaries))
    return {"mean": mean, "ci_low": mean - 1.96 * se, "ci_high": mean + 1.96 * se, "n": n, "protocol": summaries[0]["protocol"],
            "interval": "normal, from the blocks' bootstrap intervals (per-case scores are not in the block files)"}


blocks = []
for path in sorted(HERE.glob("heldout-*.json"), key=lambda p: int(p.stem.split("-")[1])):
    data = json.loads(path.read_text())
    editor = data["editors"][0]
    point = next(p for p in editor["points"] if p["n_edits"] == 256)
    blocks.append({"file": path.name, "start": data.get("start", 0), "command": data["command"], "point": point,
                   "single": editor["single"], "rounds_made": point["rounds_made"], "seconds": point["seconds"]})
starts = [b["start"] for b in blocks]
if starts != [256 * i for i in range(len(blocks))]:
    raise SystemExit(f"expected blocks starting at 0, 256, 512, ...; found {starts}")

call = {m: pooled([b["point"][m] for b in blocks]) for m in METRICS}
single = {m: pooled([b["single"][m] for b in blocks]) for m in METRICS}
kept = {m: call[m]["mean"] / single[m]["mean"] for m in ("reliability", "gen_reliability")}
per_block = [{"start": b["start"], "file": b["file"], "rounds_made": b["rounds_made"], "seconds_for_the_call": b["seconds"],
              **{m: b["point"][m]["mean"] for m in METRICS},
              **{f"single_{m}": b["single"][m]["mean"] for m in ("reliability", "gen_reliability")}} for b in blocks]
out = {"what": "256 held-out ZsRE edits in one call, four disjoint blocks of the test file (records 0-1023), pooled",
       "n_edits_per_call": 256, "blocks": per_block, "call": call, "single_edits": single, "kept_of_single": kept,
       "commands": [b["command"] for b in blocks]}
(HERE / "pooled.json").write_text(json.dumps(out, indent=2) + "\n")
for m in METRICS:
    c, s = call[m], single[m]
    print(f"{m:20s} call {100 * c['mean']:5.1f} [{100 * c['ci_low']:.1f}, {100 * c['ci_high']:.1f}]  single {100 * s['mean']:5.1f}  "
          f"blocks {' / '.join(f'{100 * b[m]:.1f}' for b in per_block)}")
print("kept of single: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in kept.items()))
