"""Ray job entry point for `distill-ray eval` (step 6).

    distill-ray submit jobs/configs/support_orders.yaml --steps eval
    python jobs/eval.py jobs/configs/support_orders.yaml   # locally, with a local Ray

Exit 1 when no student meets the bar (`task.bar`); the failing items and slices are named.
"""

import sys

from distill_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
