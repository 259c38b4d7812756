"""What the default sequence memory's sample costs before the first edit (apply_sequential(memory="auto") with neighbours):
the editor's own preservation texts continued with what the model says (greedy) against with the data's answers, on the
default model, two threads. Writes sample_cost.json beside this script.

    OMP_NUM_THREADS=2 .venv/bin/python results/analysis/in-frame-locality/sequential/neighbours/preservation/sample_cost.py runs/ls8-answer/calibrated-r4
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from instructedit.api import load_editor, sequence_memory
from instructedit.editors.preservation import key_memory
from instructedit.io import write_json
from instructedit.models.loading import load_model, max_input_length
from instructedit.tasks.collate import Collator


def main(folder: str) -> None:
    editor = load_editor(folder)
    model, tok = load_model(editor.model_name)
    raw = editor.editor_for(model, tok)
    texts = raw.preservation_texts
    out = {"editor": folder, "texts": len(texts), "threads": torch.get_num_threads(), "seconds": {}}
    for name, make in (("data", lambda: key_memory(raw, model, Collator(tok, max_input_length(model)), texts, 1.0, 4000.0, answers="data")),
                       ("model (the default)", lambda: sequence_memory(raw, model, tok))):
        start = time.perf_counter()
        memory = make()
        out["seconds"][name] = round(time.perf_counter() - start, 1)
        out.setdefault("tokens", {})[name] = memory.text_tokens
        print(name, out["seconds"][name], "s,", memory.text_tokens, "tokens", flush=True)
    write_json(Path(__file__).with_name("sample_cost.json"), out)


if __name__ == "__main__":
    main(sys.argv[1])
