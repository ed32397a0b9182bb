"""Connecting to Ray: the cluster named by RAY_ADDRESS, or a local one started on demand."""

from __future__ import annotations

import logging
import os

import ray


def init_ray(**local_kwargs) -> None:
    """Connect once per process.

    With RAY_ADDRESS set (a Ray job, or `--address`), join that cluster as it is; otherwise start a
    local Ray on 127.0.0.1. `local_kwargs` (e.g. num_cpus) apply only to a local start, since Ray
    refuses resource arguments when joining an existing cluster.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    kwargs = {} if address else {"include_dashboard": True, "dashboard_host": "127.0.0.1", **local_kwargs}
    ray.init(address=address or None, logging_level=logging.WARNING, log_to_driver=True, **kwargs)
    # Our steps print their own progress lines; Ray Data's per-operator INFO logs (its stand-in for
    # progress bars when stderr is not a terminal) would drown them out. Bars on a terminal stay.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
