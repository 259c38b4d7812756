"""The N = 256 trade-off of the calibrated editor on ZsRE's train split: reliability against locality, per (rounds,
preservation weight) — one round from ../preservation-per-call/, more from train/ (rounds.py). Writes frontier.png
and frontier.json.

    .venv/bin/python results/analysis/ls-keys/rounds/frontier.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
ONE_ROUND = {"x1": (1, 1000), "xsqrt": (1, 16000), "xn": (1, 256000)}  # ../preservation-per-call/: weight 1000 × 1, √N, N
SCALES = {"1": 1, "4": 4, "sqrt": 16, "64": 64, "n": 256}

points = []
for name, (rounds, weight) in ONE_ROUND.items():
    points.append((rounds, weight, HERE.parent / "preservation-per-call" / f"{name}.json"))
for path in sorted((HERE / "train").glob("rounds-r*.json")):
    rounds, scale = path.stem.removeprefix("rounds-r").split("-", 1)
    points.append((int(rounds), 1000 * SCALES[scale], path))

rows = []
for rounds, weight, path in points:
    editor = json.loads(path.read_text())["editors"][0]
    point = next(p for p in editor["points"] if p["n_edits"] == 256)
    single = editor.get("single")
    rows.append({"rounds": rounds, "sample_weight": weight, "file": str(path.relative_to(HERE.parent)),
                 **{k: point[k]["mean"] for k in ("reliability", "gen_reliability", "locality", "gen_locality")},
                 "seconds_per_edit": point["seconds_per_edit"]})
singles = json.loads((HERE.parent / "preservation-per-call" / "x1.json").read_text())["editors"][0]["single"]
reference = {k: singles[k]["mean"] for k in ("reliability", "gen_reliability", "locality", "gen_locality")}
(HERE / "frontier.json").write_text(json.dumps({"split": "zsre train, first 256 records", "n_edits": 256,
                                                "single_edits": reference, "points": rows}, indent=2) + "\n")

fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
for ax, (rel, loc, title) in zip(axes, [("reliability", "locality", "teacher-forced"), ("gen_reliability", "gen_locality", "generation (said / kept)")]):
    for r in rows:
        ax.scatter(100 * r[loc], 100 * r[rel], s=30 + 12 * r["rounds"], color="C0" if r["rounds"] == 1 else "C1")
        ax.annotate(f"{r['rounds']}×, w {r['sample_weight'] / 1000:g}k", (100 * r[loc], 100 * r[rel]), fontsize=8,
                    xytext=(4, 3), textcoords="offset points")
    ax.scatter(100 * reference[loc], 100 * reference[rel], marker="*", s=160, color="C2", label="each edit alone")
    ax.axvline(90, color="grey", lw=0.8, ls="--")
    ax.axhline(80 * reference[rel], color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"locality, {title.split(' ')[0]} (%)")
    ax.set_ylabel(f"reliability, {title} (%)")
    ax.set_title(f"N = 256 in one call: {title}")
    ax.legend(loc="lower left", fontsize=8)
fig.suptitle("calibrated editor, ZsRE train split: rounds (orange; size = rounds) × preservation weight; dashed: issue bars")
fig.tight_layout()
fig.savefig(HERE / "frontier.png", dpi=110)
print(json.dumps(rows, indent=1))
