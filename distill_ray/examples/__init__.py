"""Bundled example tasks: small, deterministic synthetic data sets for trying the pipeline end to end."""
