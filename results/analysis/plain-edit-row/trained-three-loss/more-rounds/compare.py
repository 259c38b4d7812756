"""The three-form-trained editor with each edit in up to four rounds (this folder) against the same recipe's editor of
2026-12-05 with each edit in one round (``..``), case by case on the whole held-out ZsRE file (n = 1,037) and on the
CounterFact test split (n = 143); and, on ZsRE 0-299, the same editor with the chat edit's answer ending the assistant's
turn (``--answer-stop newline+turn``) against a newline; writes paired.json beside this script.

The one-round editor's ZsRE report is in two parts (cases 0-299 of the held-out file, and 300-1036 evaluated from a copy
of them, ``zsre-300-1037.json``): they are joined, the second part's sources named as in the whole file.

    .venv/bin/python results/analysis/plain-edit-row/trained-three-loss/more-rounds/compare.py
"""

from __future__ import annotations

from pathlib import Path

from instructedit.evaluation.report import paired_differences
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent
ONE_ROUND = HERE.parent
FILE = "zsre_mend_eval_portability_gpt4.json"
METRICS = (("gen_reliability", "gen_post"), ("gen_reliability_plain", "gen_post"), ("gen_reliability_chat", "gen_post"),
           ("gen_generalization", "gen_post"), ("gen_locality", "gen_post"), ("reliability", "post"), ("locality", "post"))
LABELS = ("one_round_x4", "rounds_r3_x2")


def joined_zsre() -> dict:
    """The one-round editor's two ZsRE parts as one report of the whole file's cases, in its order."""
    first, rest = read_json(ONE_ROUND / "zsre-0-300.json.gz"), read_json(ONE_ROUND / "zsre-300-1037.json.gz")
    offset = len(first["cases"])
    renamed = [{**case, "source": f"{FILE}#{offset + int(case['source'].rsplit('#', 1)[1])}"} for case in rest["cases"]]
    return {"cases": first["cases"] + renamed}


def compared(title: str, a: dict, b: dict, labels: tuple[str, str], difference: str) -> dict:
    """``paired_differences`` of two reports of the same cases, each metric printed as one line under ``title``."""
    entry = paired_differences(a, b, METRICS, labels=labels, difference=difference)
    for metric, v in entry.items():
        print(f"{title} {metric} ({v['protocol']}, n={v['n']}): {labels[0]} {100 * v[labels[0]]:.1f}, {labels[1]} {100 * v[labels[1]]:.1f}, "
              f"difference {100 * v[difference]:+.1f} [{100 * v['ci_low']:+.1f}, {100 * v['ci_high']:+.1f}]")
    return entry


def main() -> None:
    rounds_zsre = read_json(HERE / "zsre-all-three-r3.json.gz")
    out = {
        "zsre": compared("zsre", joined_zsre(), rounds_zsre, LABELS, "rounds_minus_one_round"),
        "counterfact": compared("counterfact", read_json(ONE_ROUND / "counterfact-test.json.gz"),
                                read_json(HERE / "counterfact-test-three-r3.json.gz"), LABELS, "rounds_minus_one_round"),
        # the chat edit's answer ending the assistant's turn (newline+turn) against a newline, both 3 rounds at x2: cases 0-299
        "zsre_0_299_answer_stop": compared("zsre 0-299", {"cases": rounds_zsre["cases"][:300]},
                                           read_json(HERE / "zsre-0-300-three-turn-r3.json.gz"), ("newline", "newline_turn"),
                                           "turn_minus_newline"),
    }
    write_json(HERE / "paired.json", out)

if __name__ == "__main__":
    main()
