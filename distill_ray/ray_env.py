"""Connecting to Ray: the cluster named by RAY_ADDRESS, or a local one started on demand."""

from __future__ import annotations

import logging
import os
import signal
import threading

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
    on_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address=address or None, logging_level=logging.WARNING, log_to_driver=True, **kwargs)
    if callable(on_sigterm) and threading.current_thread() is threading.main_thread():
        # Ray's core worker installs its own SIGTERM handler (it aborts the process); keep the
        # caller's, which unwinds cleanly and stops what the step started.
        signal.signal(signal.SIGTERM, on_sigterm)
    # Our steps print their own progress lines; Ray Data's per-operator INFO logs (its stand-in for
    # progress bars when stderr is not a terminal) would drown them out. Bars on a terminal stay.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def on_the_head(soft: bool = True):
    """A scheduling strategy for the head node (soft: elsewhere if it cannot), for the detached
    actors the whole cluster shares (a teacher's ledger): a lost worker node must not take them along,
    and when the head goes the cluster goes with it. Falls back to this process's node where no node
    says it is the head."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})),
                ray.get_runtime_context().get_node_id())
    return NodeAffinitySchedulingStrategy(head, soft=soft)


def on_this_node():
    """A scheduling strategy for this process's node (hard affinity): the actors a job's state hangs
    on — a teacher's rate limiter with its spend — live and die with the job's driver, not on a
    worker node that may be lost mid-run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
