#!/usr/bin/env bash
# Here (with .venv set up): what tests/gpu/gpu_check.sh needs on a GPU machine that has torch and
# transformers but no Ray, DeepSpeed or pydantic, and no network. Writes .gpu/ (in .gitignore; about 10 MB with the wheels):
#   .gpu/smollm2/   SmolLM2-135M-Instruct's config.json and tokenizer (its weights do not travel; see gpu_check.py)
#   .gpu/wheels/    DeepSpeed built as a wheel here, and its pure-Python needs the GPU image lacks
# Then, on the GPU machine: tests/gpu/gpu_check.sh   (carry .gpu)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .gpu/smollm2 .gpu/wheels
# The last line: on a fresh machine the first call converts the wheel's GGUF, and DeepSpeed logs to stdout.
src=$(HF_HUB_OFFLINE=1 .venv/bin/python -c "from distill_ray.models import model_folder; print(model_folder('smollm2'))" | tail -n 1)
cp "$src"/config.json "$src"/tokenizer.json "$src"/tokenizer_config.json .gpu/smollm2/
cp "$src"/chat_template.jinja .gpu/smollm2/ 2>/dev/null || true
if [ "${1:-}" != "--no-wheels" ]; then
  ds=$(.venv/bin/python -c "from importlib.metadata import version; print(version('deepspeed'))")
  pd=$(.venv/bin/python -c "import pydantic; print(pydantic.VERSION)")
  pc=$(.venv/bin/python -c "import pydantic_core; print(pydantic_core.__version__)")
  # DeepSpeed is published as a source archive: build the wheel here (pure Python; its ops build on use).
  # --no-build-isolation: its setup.py imports torch (an isolated build would fetch a CUDA torch)
  DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .gpu/wheels "deepspeed==$ds"
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/wheels \
    hjson "pydantic==$pd" "pydantic_core==$pc" annotated-types typing-inspection
fi
du -sh .gpu
