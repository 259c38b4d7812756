import sys, torch, time, json
sys.path.insert(0, "/work/main/benchmarks")
torch.set_num_threads(2)
from bench_eval import EvalSetup, DEFAULT_MODEL, answers
import instructedit
task, out, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = EvalSetup.load("/work/main/runs/ls8-answer/calibrated-r4", DEFAULT_MODEL, task, 30)
s.evaluate("both", s.records[:3])
res = {"code": instructedit.__file__, "tf": [], "both": []}
for _ in range(reps):
    t = time.perf_counter(); tf = s.evaluate("teacher_forced"); res["tf"].append(time.perf_counter() - t)
    t = time.perf_counter(); both = s.evaluate("both"); res["both"].append(time.perf_counter() - t)
res["answers"] = answers(both)
res["post"] = [c.post for c in tf.cases]
res["gen_post"] = [c.gen_post for c in both.cases]
json.dump(res, open(out, "w"))
print(out, "tf", [round(x, 2) for x in res["tf"]], "both", [round(x, 2) for x in res["both"]])
