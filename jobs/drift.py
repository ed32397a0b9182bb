"""Ray job entry point for `distill-ray drift`: served traffic (serve/logs/) against the training prompts.

    distill-ray submit jobs/configs/support_orders.yaml --steps drift
    python jobs/drift.py jobs/configs/support_orders.yaml
"""

import sys

from distill_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["drift", *sys.argv[1:]]))
