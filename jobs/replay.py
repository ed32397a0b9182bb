"""Ray job entry point for `distill-ray replay` (step 7 with traffic; a step of `distill-ray run`).

    distill-ray submit jobs/configs/support_orders.yaml --steps replay
    python jobs/replay.py jobs/configs/support_orders.yaml   # locally, with a local Ray

Serves the student behind the safety net, replays the held-out prompts in shadow mode and then in
canary, and removes the app. For a long-running endpoint use `distill-ray serve` (or the RayService).
"""

import sys

from distill_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["replay", *sys.argv[1:]]))
