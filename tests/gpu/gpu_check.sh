#!/usr/bin/env bash
# ZeRO-3 bf16 training of the SmolLM2 student on one GPU, without Ray: prints tokens/s, MFU and peak
# memory in under 5 minutes. Prepare here first: tests/gpu/prepare.sh (writes .gpu/, carried to the GPU
# machine). Options go to tests/gpu/gpu_check.py (--cpu: the dry run on CPU; --steps, --batch,
# --gradient-checkpointing).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if ! "$PY" -c "import deepspeed, pydantic" 2>/dev/null; then
  [ -d .gpu/wheels ] || { echo "gpu_check: DeepSpeed is missing and there is no .gpu/wheels (run tests/gpu/prepare.sh)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-check-site .gpu/wheels/*.whl
  export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$PY" tests/gpu/gpu_check.py "$@"
