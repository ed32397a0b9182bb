"""Ray job entry point for `distill-ray run`: several steps in order, as one job.

    distill-ray submit jobs/configs/support_orders.yaml --steps prompts,generate,filter
    python jobs/run.py jobs/configs/support_orders.yaml --steps prompts -o prompts.size=200   # locally

Inside a Ray job RAY_ADDRESS is set, so every step joins that cluster; teachers' API keys are read on
each node from the environment variables the config names.
"""

import sys

from distill_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
