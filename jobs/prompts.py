"""Ray job entry point for step 2, the prompt set (what `distill-ray prompts` runs).

    ray job submit --working-dir . -- python jobs/prompts.py jobs/configs/support_orders.yaml
    python jobs/prompts.py jobs/configs/support_orders.yaml -o prompts.size=200   # a tiny CPU run

Inside a Ray job RAY_ADDRESS is set, so the step joins that cluster; run directly it starts a
local Ray.
"""

import sys

from distill_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prompts", *sys.argv[1:]]))
