"""A preservation sample that is not ZsRE's: CounterFact's locality prompts written in ZsRE's record format (kept as run).

    .venv/bin/python results/analysis/ls-keys/train-scale/counterfact_preservation.py /tmp/cf-preserve.json

Each record of ../shared/data/counterfact/train_cf.json with a locality prompt becomes one ZsRE-format record whose
``loc`` / ``loc_ans`` are that prompt and its ground truth (the other fields are the record's own edit: ``analyze batch
--preserve-data`` reads only the locality pair). Written outside the repository (the data stays in ../shared).
"""

import json
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[4] / ".." / "shared" / "data" / "counterfact" / "train_cf.json"

rows = []
for record in json.loads(SOURCE.read_text()):
    for probe in (record.get("locality") or {}).get("Relation_Specificity", [])[:1]:
        if probe.get("prompt") and probe.get("ground_truth"):
            rows.append({"subject": record["subject"], "src": record["prompt"], "pred": record["ground_truth"], "rephrase": record["prompt"],
                         "alt": record["target_new"], "answers": [record["ground_truth"]], "loc": probe["prompt"],
                         "loc_ans": probe["ground_truth"] if isinstance(probe["ground_truth"], str) else probe["ground_truth"][0],
                         "cond": ""})
Path(sys.argv[1]).write_text(json.dumps(rows))
print(f"{len(rows)} records written to {sys.argv[1]}")
