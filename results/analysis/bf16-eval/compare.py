"""The same evaluation with the model in float32 and in bfloat16, case by case; writes agreement.json beside this script.

    .venv/bin/python results/analysis/bf16-eval/compare.py
"""

from __future__ import annotations

from pathlib import Path

from instructedit.evaluation.report import paired_differences
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent


def main() -> None:
    runs = {dtype: read_json(HERE / f"zsre-all-{dtype}.json.gz") for dtype in ("float32", "bfloat16")}
    a, b = (runs[d]["cases"] for d in ("float32", "bfloat16"))
    assert [c["source"] for c in a] == [c["source"] for c in b]
    out: dict = {"n_cases": len(a), "settings": {d: {k: r["settings"][k] for k in ("model_dtype", "editor_sha256", "device")}
                                                  for d, r in runs.items()},
                 "timing": {d: r["timing"] for d, r in runs.items()}}
    pairs = [(p, q) for x, y in zip(a, b) for p, q in zip(x["answers"], y["answers"], strict=True)]
    out["answers"] = {"pairs": len(pairs), "pre_differ": sum(p["pre_text"] != q["pre_text"] for p, q in pairs),
                      "post_differ": sum(p["post_text"] != q["post_text"] for p, q in pairs)}
    out |= paired_differences(runs["float32"], runs["bfloat16"], (("gen_reliability", "gen_post"), ("gen_generalization", "gen_post"),
                              ("gen_locality", "gen_post"), ("reliability", "post"), ("locality", "post")),
                              labels=("float32", "bfloat16"), difference="bfloat16_minus_float32")
    write_json(HERE / "agreement.json", out)
    for key, value in out.items():
        if isinstance(value, dict) and "bfloat16_minus_float32" in value:
            print(f"{key} ({value['protocol']}): float32 {100 * value['float32']:.1f}, bfloat16 {100 * value['bfloat16']:.1f}, "
                  f"difference {100 * value['bfloat16_minus_float32']:+.1f} [{100 * value['ci_low']:+.1f}, {100 * value['ci_high']:+.1f}], "
                  f"{value['cases_differing']} of {value['n']} cases differ")
    print(out["answers"])


if __name__ == "__main__":
    main()
