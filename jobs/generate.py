"""Ray job entry point for `distill-ray generate` (step 3a).

    ray job submit --working-dir . -- python jobs/generate.py jobs/configs/support_orders.yaml
    python jobs/generate.py jobs/configs/support_orders.yaml   # locally, with a local Ray

Inside a Ray job RAY_ADDRESS is set, so the step joins that cluster; teachers' API keys are read on
each node from the environment variables the config names.
"""

import sys

from distill_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
