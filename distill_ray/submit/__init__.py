"""Running pipeline steps as Ray jobs: connecting to a cluster's Jobs API, submitting, following.

`distill-ray submit` and `distill-ray jobs ...` are thin faces over `submit.py` and `client.py`.
"""
