"""Ray job entry point for `distill-ray filter` (step 3b).

    ray job submit --working-dir . -- python jobs/filter.py jobs/configs/support_orders.yaml
    python jobs/filter.py jobs/configs/support_orders.yaml   # locally, with a local Ray

Inside a Ray job RAY_ADDRESS is set, so the step joins that cluster; teachers' API keys are read on
each node from the environment variables the config names.
"""

import sys

from distill_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["filter", *sys.argv[1:]]))
