"""Where does lifelong editing with the recommended editor + key memory collapse? Replays analyze sequential's setup
(same CLI arguments) and after every edit from START on records the held-out perplexity (first 40 texts) and the
edit's weight change. PROBE=1: also prints, for every ridge solve from edit START on, its conditioning, float32 against
float64 solution and the Gram's largest eigenvalue (collapse-probe-edit-404.txt; run as collapse_probe.py, the same
script with the probe always on, merged into this one afterwards)."""
import sys, json, time
import torch
from instructedit.cli import build_parser
from instructedit.commands import analyze_edits as AE
from instructedit.analysis import many_edits as ME
from instructedit.editors.base import SequentialWeightEdits, keep_in_sequence
from instructedit.editors.aggregation import remembering
import os
if os.environ.get("F64"):
    from instructedit.editors import aggregation as AG
    def ridge64(gram, cross, log_lambda, prior=None):
        eye = torch.eye(gram.shape[0], dtype=torch.float64)
        system = gram.double() + log_lambda.detach().double().exp() * eye
        if prior is not None:
            system = system + prior.double()
        return torch.linalg.solve(system, cross.double()).to(cross.dtype)
    AG.ridge_solve = ridge64
Z = "../shared/data/zsre/zsre_mend_train-1k.json"
START, END = int(sys.argv[1]), int(sys.argv[2])
argv = ["analyze", "sequential", "--editor", "runs/ls8-answer/calibrated", "--task", "zsre", "--edits", str(END), "--held-out-data", Z,
        "--key-memory", "--preserve-data", Z, "--preserve-start", "200", "--preserve", "400", "--preserve-weight", sys.argv[3],
        "--preserve-answers", "both", "--no-progress", "--output", "/tmp/x.json"] + sys.argv[4:]
args = build_parser().parse_args(argv)
AE.check_key_memory_arguments(args) if hasattr(AE, "check_key_memory_arguments") else None
records, _ = AE._records(args, args.data, args.edits, "--edits")
held_out = AE._records(args, args.held_out_data, 0, "--held-out")[0][: args.held_out]
preserve = AE._preservation_texts(args, held_out)
loaded = AE._load(args, args.editor[0], "x")
model, collator, editor = loaded.model, loaded.collator, loaded.editor
memory = ME.key_memory(editor, model, collator, preserve, args.past_weight, args.preserve_weight, args.batch_size, args.preserve_answers, args.preserve_keys)
texts = ME.locality_texts(held_out)[:40]
base = ME.perplexity(model, collator, texts)
names = [w.name for w in editor.weights]
params = dict(model.named_parameters())
log = []
weights, handles = SequentialWeightEdits(model, editor), []
probe = {"on": False}
if os.environ.get("PROBE"):
    from instructedit.editors import aggregation as AG
    usual_solve = AG.ridge_solve
    def probed(gram, cross, log_lambda, prior=None):
        out = usual_solve(gram, cross, log_lambda, prior)
        if probe["on"]:
            A = (gram + log_lambda.exp() * torch.eye(gram.shape[0]) + (prior if prior is not None else 0)).double()
            ev = torch.linalg.eigvalsh(A)
            s64 = torch.linalg.solve(A, cross.double())
            print("d_in", gram.shape[0], "lambda", float(log_lambda.exp()), "eig min/max", float(ev.min()), float(ev.max()),
                  "|out| f32", float(out.norm()), "|out| f64", float(s64.norm()), "rel diff", float((out.double() - s64).norm() / s64.norm()),
                  "gram max eig", float(torch.linalg.eigvalsh(gram.double()).max()), flush=True)
        return out
    AG.ridge_solve = probed
with remembering(editor, memory):
    for i in range(END):
        probe["on"] = i + 1 >= START
        before = {n: params[n].detach().clone() for n in names} if i >= START else None
        batch = ME._edit_batch(collator, records[i:i + 1], loaded.instruction).to("cpu")
        keep_in_sequence(weights, handles, editor.apply(model, batch), batch)
        if i >= START:
            d = max(float((params[n] - before[n]).norm() / before[n].norm()) for n in names)
            ppl = ME.perplexity(model, collator, texts)
            log.append({"edit": i + 1, "ppl_ratio": ppl / base, "max_rel_change": d})
            print(i + 1, f"ppl x{ppl / base:.3f}", f"max relative weight change {d:.2e}", flush=True)
            if ppl / base > 100:
                break
json.dump(log, open(f"/work/scratch31/collapse-{sys.argv[3]}{os.environ.get('F64', '')}.json", "w"))
