"""Testing utilities for distill-ray's users and its own tests: ``fake_teacher``, a scripted OpenAI-compatible
teacher on 127.0.0.1 (faults, rate limits, a billing ledger, Azure's routes, the Batches API)."""
