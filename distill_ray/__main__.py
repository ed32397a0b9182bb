"""`python -m distill_ray` is `distill-ray`."""

import sys

from distill_ray.cli import main

sys.exit(main())
