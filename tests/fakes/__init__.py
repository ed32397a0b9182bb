"""Fakes only the tests use: a scripted LLM judge for the fake teacher (`judge`). The fake teacher itself is
`distill_ray.testing.fake_teacher`, for users' tests and the benchmarks too."""
