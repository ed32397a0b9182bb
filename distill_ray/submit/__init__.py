"""Submitting pipeline steps to a Ray cluster as Ray jobs, and following them (the Jobs API client).

Not to be confused with the repository's top-level `jobs/`: those are the entry points the cluster
runs (`python jobs/<step>.py CONFIG`) and the example configs; this package sends them there.
`distill-ray submit` and `distill-ray jobs ...` (`cli.py`) are thin faces over `job.py` (validate,
stage, submit) and `client.py` (connect, list, status, logs, stop, follow).
"""
