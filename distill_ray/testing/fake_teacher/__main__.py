"""``python -m distill_ray.testing.fake_teacher --config '{...}' --port 8000``: the fake teacher in this process."""

from distill_ray.testing.fake_teacher.process import main

main()
