#!/bin/sh
# Fill .device/ (git-ignored) with what benchmarks/device/gpu_check.py needs on a GPU machine that reaches no network:
# the transformers wheel this checkout is tested with, the data files it reads, and the default model's config and
# tokenizer (its weights do not fit a device call: see README.md beside this script). Run from the repository root.
set -eu
cd "$(dirname "$0")/../.."
DATA=${INSTRUCTEDIT_DATA:-../shared/data}
rm -rf .device && mkdir -p .device/whl .device/model .device/data
# transformers and what it needs at the versions of this checkout's .venv: the device image's own are older
# (transformers 5.17 with huggingface_hub 1.x, 2026-11) than transformers 5.25's import-time check allows
for package in transformers huggingface_hub httpx2 httpcore2 truststore kernels tomlkit hf-xet regex tokenizers accelerate safetensors; do
    version=$(.venv/bin/python -m pip show "$package" 2>/dev/null | sed -n 's/^Version: //p')
    [ -n "$version" ] || { echo "prepare.sh: $package is not in .venv" >&2; exit 1; }
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .device/whl "$package==$version"
done
model=$(.venv/bin/python -c "from instructedit.models.loading import default_model_dir; print(default_model_dir())")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    [ -f "$model/$f" ] && cp "$model/$f" .device/model/
done
for f in zsre/zsre_mend_eval_portability_gpt4.json zsre/zsre_mend_train-1k.json counterfact/train_cf.json \
         recent/recent_train.json convsent/blender_test.json convsent/blender_val.json; do
    mkdir -p ".device/data/$(dirname "$f")" && cp "$DATA/$f" ".device/data/$f"
done
du -sh .device
echo "tracked tree: $(git ls-files -z | xargs -0 du -ck | tail -1 | cut -f1) KiB; with .device: under 64 MiB is what a call carries"
