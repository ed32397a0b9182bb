"""Real parts for integration tests: a moto S3 server on 127.0.0.1, one local Ray per session, and the inputs
several modules share, each built once per session: the prompt set, the filtered set and a tiny student.

The S3 endpoint is put in the environment before Ray starts so that Ray's worker processes
inherit it, as they would inherit an instance role's settings on a cluster.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import boto3
import pytest
import ray

from tests.helpers.models import save_tiny_student
from tests.helpers.net import free_port
from tests.helpers.steps import build_filtered, build_prompt_set

# The fake teacher's API key, in the environment before Ray starts so that its workers inherit it
# (as pods get theirs from a Kubernetes secret). Random per session: tests grep for it in outputs.
os.environ.setdefault("DISTILL_TEST_TEACHER_KEY", "sk-test-" + secrets.token_hex(12))
# Ray Train's controller polls its workers this often; the 2 s default makes every report slow.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Workers push their metrics to the node's Prometheus endpoint every 10 s by default: 1 s in tests.
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
# Ray keeps at most num_cpus (here 2) idle worker processes and kills the rest after 1 s, so on this
# machine every Ray Data operator after the first (a hash shuffle's aggregators, the next map) waits for
# new Python workers to start and import pyarrow: 40 prompts took 19 s to dedupe, 0.4 s with workers
# kept warm. Every Ray these tests start (ray_local, and the drivers and heads they start in
# subprocesses) inherits these.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "600000")


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION")}
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"})
    yield endpoint
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    name = "test-" + request.node.name.lower().replace("_", "-")[:40]
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_local(s3_endpoint, tmp_path_factory):
    """One local Ray for the whole session (2 CPUs), stopped at the end."""
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def prompt_set(ray_local, tmp_path_factory) -> Path:
    """A prompt set of N_PROMPTS distinct messages (tests.helpers.steps); tests copy it into their workdir."""
    return build_prompt_set(tmp_path_factory.mktemp("prompt-set"))


@pytest.fixture(scope="session")
def filtered(ray_local, prompt_set, tmp_path_factory) -> Path:
    """prompts -> generate (the scripted teacher) -> filter; tests copy it into their own workdir."""
    return build_filtered(prompt_set, tmp_path_factory.mktemp("filtered") / "run")


@pytest.fixture(scope="session")
def student_folder(tmp_path_factory) -> Path:
    """A tiny 4-layer student saved as a base model."""
    return save_tiny_student(tmp_path_factory.mktemp("tiny-student"))
