"""The GPU tests' Ray: every CPU up to 8 and every GPU of the machine, once per module."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=min(8, os.cpu_count() or 1), num_gpus=torch.cuda.device_count(), include_dashboard=True,
             dashboard_host="127.0.0.1", logging_level="ERROR")
    yield
    ray.shutdown()
