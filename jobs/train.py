"""Ray job entry point for `distill-ray train` (steps 4-5).

    ray job submit --working-dir . -- python jobs/train.py jobs/configs/support_orders.yaml
    python jobs/train.py jobs/configs/support_orders.yaml   # locally, with a local Ray

Inside a Ray job RAY_ADDRESS is set, so the step joins that cluster; Ray Train places its workers
there (GPUs when train.use_gpu is true).
"""

import sys

from distill_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
