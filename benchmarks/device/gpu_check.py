"""The GPU check: instructedit's main paths on CUDA, and the timings that need a GPU, in one call of under 10 minutes.

No session of this project has run the code on a GPU; this script is what a session that is lent one (15 minutes of
device time in all, see README.md beside it) runs in one call. Each stage runs as a subprocess with its own time limit
inside one deadline, and a stage that fails or runs out of time is recorded and the next one runs. After every stage the
summary ``OUT/gpu_check.json`` is rewritten (what each stage ran, its exit status, seconds, the end of its output, and
what it measured), so a call cut short still returns what it finished.

The model has the default model's architecture and tokenizer with RANDOM weights (its 98 MB GGUF file does not fit the
64 MiB a device call carries): what it checks is that the code runs on CUDA (float32 and a bfloat16 base) and how long
things take, which depends on the shapes, not on the weights. Quality is measured on the CPU.

Stages, in order of what matters most:
- ``env``: torch, CUDA, the GPU, transformers.
- ``model``: the random-weight model folder.
- ``train``: the recommended recipe (configs/smollm2-135m/least-squares.yaml: least squares, 8 edits a step) for a few
  steps on CUDA, validation and checkpoints included; seconds per step.
- ``calibrate``: a preservation sample, step-size multipliers and rounds on its validation split (the recommended
  editor's making, cut down).
- ``batch_edit`` (issue "Many edits": seconds per edit at N = 256 at most 1/20 of a single edit's):
  benchmarks/bench_batch_edit.py on CUDA, single edits as a user makes them against 256 held-out ZsRE edits in one call
  at 1, 8 and 32 rounds, holding the NQ sample still as the best held-out call does.
- ``evaluate``: 64 held-out ZsRE cases teacher-forced and with both protocols (cases per second, the two side by side),
  and with both protocols on a bfloat16 model (``--dtype bfloat16``).
- ``api``: benchmarks/device/api_check.py: ``apply``, ``apply_sequential`` with a key memory, ``rollback_to`` and the
  evaluation runner from Python, with editors loaded on the CPU as ``load_editor`` loads them by default.
- ``edit``: ``instructedit edit`` on CUDA, what the model says before and after.
- ``train_bf16``: the paper recipe on a bfloat16 base for a few steps.
- ``resume``: the recommended recipe's run resumed from last/ for two more steps.

    python3 benchmarks/device/gpu_check.py --out "$OUT" [--deadline 540] [--stages train,batch_edit]
    python3 benchmarks/device/gpu_check.py --out /tmp/check --device cpu --quick   # the same stages, cut down, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / ".device"  # filled by prepare.sh
CLI = [sys.executable, "-m", "instructedit.cli"]
# what a GPU or bfloat16 may show first (AUDIT.md beside this script): the fast paths' checks falling back, rollback's check
FALLBACKS = ("does not reproduce", "packed rows differ", "packed inputs do not reproduce", "not deterministic", "Traceback")
STAGES = ("env", "model", "train", "calibrate", "batch_edit", "evaluate", "api", "edit", "train_bf16", "resume")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and the benchmarks' JSON")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"), help="scratch folder (model, runs)")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds for all stages (default 540)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES)}")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a dry run of the script itself)")
    parser.add_argument("--quick", action="store_true", help="a few edits and cases per stage (a dry run on a CPU)")
    args = parser.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; known: {', '.join(STAGES)}")
    Check(args).run(stages)


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out, self.work, self.device = args.out, args.work, args.device
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.model = self.work / "smollm2-135m-random"
        self.run_dir = self.work / "ls"
        self.editor = self.run_dir / "calibrated"
        self.start = time.monotonic()
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "INSTRUCTEDIT_DATA": str(KIT / "data"), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.summary: dict = {"script": "benchmarks/device/gpu_check.py", "argv": sys.argv[1:], "device": self.device,
                              "model": "the default model's architecture and tokenizer, random weights (seed 0)",
                              "platform": platform.platform(), "stages": {}}
        q = args.quick
        self.n_edits, self.singles, self.reps = (8, 2, 1) if q else (256, 12, 2)
        self.rounds = "1,2" if q else "1,8,32"
        self.preserve = 20 if q else 998
        self.cases = 4 if q else 64
        self.steps = 2 if q else 8

    def left(self) -> float:
        return self.args.deadline - (time.monotonic() - self.start)

    def save(self) -> None:
        tmp = self.out / ".gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=2) + "\n")
        os.replace(tmp, self.out / "gpu_check.json")

    def run(self, stages: list[str]) -> None:
        for stage in stages:
            if self.left() < 15:
                self.summary["stages"][stage] = {"status": "not run: the deadline came first"}
                self.save()
                continue
            began = time.monotonic()
            try:
                record = getattr(self, f"stage_{stage}")()
            except Exception as error:  # noqa: BLE001 - a broken stage is recorded; the next one runs
                record = {"status": "error", "error": f"{type(error).__name__}: {error}"}
            record.setdefault("status", "ok")
            record["seconds"] = round(time.monotonic() - began, 1)
            self.summary["stages"][stage] = record
            self.save()
            print(f"[gpu_check] {stage}: {record['status']} in {record['seconds']} s", flush=True)
        self.summary["total_s"] = round(time.monotonic() - self.start, 1)
        self.save()

    def sh(self, command: list[str], limit: float) -> dict:
        """Run ``command`` from the repository root with at most ``limit`` seconds (and what the deadline leaves)."""
        limit = max(5.0, min(limit, self.left() - 5))
        began = time.monotonic()
        try:
            done = subprocess.run(command, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=limit)
            code, text = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as stopped:
            code = "timeout"
            text = (stopped.stdout or b"").decode(errors="replace") + (stopped.stderr or b"").decode(errors="replace")
        record = {"command": " ".join(str(c) for c in command), "rc": code, "wall_s": round(time.monotonic() - began, 1),
                  "limit_s": round(limit), "output_tail": text[-2500:]}
        flagged = [line[:300] for line in text.splitlines() if any(f in line for f in FALLBACKS)]
        if flagged:  # anywhere in the output, not only its tail
            record["flagged_lines"] = flagged[:20]
        if code != 0:
            record["status"] = "failed" if code != "timeout" else "timeout"
        return record

    # -- stages ------------------------------------------------------------------------------------------------------

    def stage_env(self) -> dict:
        code = ("import json, torch, transformers; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
                "'cuda': torch.version.cuda, 'cuda_available': c, 'gpu': torch.cuda.get_device_name() if c else None, "
                "'bf16': torch.cuda.is_bf16_supported() if c else None, 'transformers': transformers.__version__, "
                "'transformers_file': transformers.__file__}))")
        record = self.sh([sys.executable, "-c", code], 60)
        if record.get("rc") == 0:
            record["found"] = json.loads(record["output_tail"].strip().splitlines()[-1])
            if self.device.startswith("cuda") and not record["found"]["cuda_available"]:
                record["status"] = "failed"
        return record

    def stage_model(self) -> dict:
        source = KIT / "model"
        if not (source / "config.json").is_file():
            return {"status": "failed", "error": f"{source}/config.json missing: run benchmarks/device/prepare.sh first"}
        code = ("import sys, torch; from transformers import AutoConfig, AutoModelForCausalLM; torch.manual_seed(0); "
                "config = AutoConfig.from_pretrained(sys.argv[1]); model = AutoModelForCausalLM.from_config(config); "
                "model.save_pretrained(sys.argv[2]); print(sum(p.numel() for p in model.parameters()))")
        if self.model.exists():
            shutil.rmtree(self.model)
        record = self.sh([sys.executable, "-c", code, str(source), str(self.model)], 120)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
            if (source / name).is_file():
                shutil.copy(source / name, self.model / name)
        return record

    def _train(self, config: str, output: Path, steps: int, *extra: str) -> list[str]:
        """``train`` for ``steps`` steps, validating at the last of ``self.steps`` and checkpointing halfway (a resume
        asks for more steps with the same options, which a run folder requires)."""
        return [*CLI, "train", "--config", config, "--output", str(output), "--no-progress",
                "--set", f"model.name={self.model}", "--set", f"training.device={self.device}",
                "--set", f"training.max_steps={steps}", "--set", f"training.val_every={self.steps}", "--set", "training.val_size=16",
                "--set", f"training.checkpoint_every={max(1, self.steps // 2)}", "--set", "training.log_every=1", *extra]

    def _steps(self, run: Path) -> dict:
        summary = run / "summary.json"
        if not summary.is_file():
            return {}
        kept = json.loads(summary.read_text())
        last = kept.get("last_validation") or {}
        return {"summary": {k: kept.get(k) for k in ("steps", "best_step", "stopped_early", "skipped_nonfinite", "records_per_step")},
                "last_validation": {k: last.get(k) for k in ("step", "loss", "edit_acc", "locality", "gen_reliability", "gen_locality")}}

    def stage_train(self) -> dict:
        if self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        record = self.sh(self._train("configs/smollm2-135m/least-squares.yaml", self.run_dir, self.steps), 150)
        record.update(self._steps(self.run_dir))
        if record.get("rc") == 0:
            record["s_per_step_including_setup_and_validation"] = round(record["wall_s"] / self.steps, 2)
        return record

    def stage_calibrate(self) -> dict:
        return self.sh([*CLI, "calibrate", "--run", str(self.run_dir), "--scales", "2", "--rounds", "1,2",
                        "--preserve", "100", "--preserve-weight", "1000", "--val-size", "16" if self.args.quick else "32",
                        "--output", str(self.editor)], 120)

    def stage_batch_edit(self) -> dict:
        output = self.out / "batch_edit.json"
        record = self.sh([sys.executable, "benchmarks/bench_batch_edit.py", "--device", self.device, "--editor", str(self.editor),
                          "--model", str(self.model), "--n", str(self.n_edits), "--singles", str(self.singles),
                          "--reps", str(self.reps), "--warmup", "1", "--rounds", self.rounds, "--key-memory",
                          "--preserve-data", str(KIT / "data" / "zsre" / "zsre_mend_train-1k.json"),
                          "--preserve", str(self.preserve), "--preserve-weight", "128000", "--preserve-answers", "both",
                          "--output", str(output)], 200)
        if output.is_file():
            rows = json.loads(output.read_text())["editors"]
            record["found"] = {path: {"single_edit_s": row["single_edit_s"],
                                      **{config: {k: call[k] for k in ("batched_call_s", "ratio_per_edit", "rounds_made")} for config, call in row["calls"].items()}}
                               for path, row in rows.items()}
        return record

    def stage_evaluate(self) -> dict:
        found, runs = {}, []
        for protocol, dtype in (("teacher_forced", "float32"), ("both", "float32"), ("both", "bfloat16")):
            label = protocol if dtype == "float32" else f"{protocol}-{dtype}"
            output = self.out / f"eval-{label}.json"
            record = self.sh([*CLI, "evaluate", "--editor", str(self.editor), "--model", str(self.model), "--task", "zsre",
                              "--limit", str(self.cases), "--protocol", protocol, "--dtype", dtype, "--device", self.device,
                              "--no-progress", "--output", str(output)], 120)
            runs.append(record)
            if output.is_file():
                report = json.loads(output.read_text())
                found[label] = report["timing"]
                (self.out / f"eval-{label}.md").unlink(missing_ok=True)  # at most 8 files come back
        result = {"runs": runs, "found": found}
        if any(r.get("status") for r in runs):
            result["status"] = "failed"
        elif {"teacher_forced", "both"} <= set(found):
            result["both_over_teacher_forced_run_s"] = found["both"]["run_s"] / found["teacher_forced"]["run_s"]
        return result

    def stage_api(self) -> dict:
        record = self.sh([sys.executable, "benchmarks/device/api_check.py", str(self.editor), str(self.model), "--device", self.device,
                          "--cases", "2" if self.args.quick else "8"], 120)
        last = [line for line in record["output_tail"].splitlines() if line.startswith('{"all"')]
        if last:
            record["found"] = json.loads(last[-1])["all"]
        return record

    def stage_edit(self) -> dict:
        return self.sh([*CLI, "edit", "--editor", str(self.editor), "--model", str(self.model), "--device", self.device,
                        "--prompt", "What is the capital of France?", "--target", "Rome"], 90)

    def stage_train_bf16(self) -> dict:
        run = self.work / "paper-bf16"
        if run.exists():
            shutil.rmtree(run)
        record = self.sh(self._train("configs/smollm2-135m/instructedit.yaml", run, self.steps, "--set", "model.dtype=bfloat16"), 120)
        record.update(self._steps(run))
        return record

    def stage_resume(self) -> dict:
        record = self.sh(self._train("configs/smollm2-135m/least-squares.yaml", self.run_dir, self.steps + 2), 90)
        record.update(self._steps(self.run_dir))
        record["resumed"] = "resum" in record.get("output_tail", "").lower()
        return record


if __name__ == "__main__":
    main()
