"""Ray job entry point for `distill-ray redistill`: the flywheel, a round of distillation on the served traffic.

    distill-ray submit jobs/configs/support_orders.yaml --steps redistill
    python jobs/redistill.py jobs/configs/support_orders.yaml
"""

import sys

from distill_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["redistill", *sys.argv[1:]]))
