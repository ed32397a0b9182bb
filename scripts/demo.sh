#!/usr/bin/env bash
# The main job: set up, then run the pipeline on the bundled example with a local Ray.
# Extra arguments go to `distill-ray run` (e.g. -o prompts.size=500 or --steps prompts).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/distill-ray validate jobs/configs/support_orders.yaml > /dev/null
echo "config jobs/configs/support_orders.yaml is valid (distill-ray validate prints it resolved)"
# Every step: the prompt set, the teacher's answers (the offline teacher is started for the steps
# that call it and stopped after), the filter, two students trained with DeepSpeed on Ray Train,
# eval against the teacher, the student served on Ray Serve with the held-out traffic replayed in
# shadow mode then canary, and drift. It ends with the distillation summary.
exec .venv/bin/distill-ray run jobs/configs/support_orders.yaml "$@"
