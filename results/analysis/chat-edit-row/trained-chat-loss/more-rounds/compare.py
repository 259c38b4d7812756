"""Held-out ZsRE 0-299 and the CounterFact test split, case by case: the chat-trained editor in four rounds at x0.75 against
the recommended network with its edits made in the wrapped and chat forms (three rounds at x0.75; on ZsRE also its grid's
choice, two rounds at x1); writes paired.json beside this script.

    .venv/bin/python results/analysis/chat-edit-row/trained-chat-loss/more-rounds/compare.py
"""

from __future__ import annotations

from pathlib import Path

from instructedit.evaluation.report import paired_differences
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent
PAIRS = {  # (task, the other editor): (its report, the chat-trained editor's)
    ("zsre", "recommended_chat_forms_r3_x0.75"): ("zsre-0-300-recommended-chat-forms-x0.75.json.gz", "zsre-0-300-chat-r4.json.gz"),
    ("zsre", "recommended_chat_forms_r2_x1"): ("zsre-0-300-recommended-chat-forms-r4.json.gz", "zsre-0-300-chat-r4.json.gz"),
    ("counterfact", "recommended_chat_forms_r3_x0.75"): ("counterfact-test-recommended-chat-forms-x0.75.json.gz",
                                                         "counterfact-test-chat-r4.json.gz"),
}
METRICS = (("gen_reliability", "gen_post"), ("gen_reliability_chat", "gen_post"), ("gen_reliability_plain", "gen_post"),
           ("gen_generalization", "gen_post"), ("gen_locality", "gen_post"), ("reliability", "post"), ("locality", "post"))


def main() -> None:
    out: dict = {}
    for (task, name), (other, chat) in PAIRS.items():
        entry = paired_differences(read_json(HERE / other), read_json(HERE / chat), METRICS, labels=(name, "chat_trained_r4_x0.75"),
                                   difference="chat_trained_minus_other")
        out.setdefault(task, {})[name] = entry
        for metric, v in entry.items():
            print(f"{task} {metric} ({v['protocol']}, n={v['n']}): {name} {100 * v[name]:.1f}, chat-trained {100 * v['chat_trained_r4_x0.75']:.1f}, "
                  f"difference {100 * v['chat_trained_minus_other']:+.1f} [{100 * v['ci_low']:+.1f}, {100 * v['ci_high']:+.1f}]")
    write_json(HERE / "paired.json", out)


if __name__ == "__main__":
    main()
