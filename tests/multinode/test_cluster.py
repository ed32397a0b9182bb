"""distill-ray on a real multi-node Ray cluster on this machine: a head (1 CPU) and worker nodes w1
and w2 (2 CPUs each), started with `cluster/local_head.py` (`ray start`), each with its own custom
resource. Every step runs through the CLI with `--address`, as on a fleet.

    scripts/test.sh -m multinode        # about 6 minutes on 2 cores

The teacher is the scripted fake on 127.0.0.1 (its own process); its ledger is what a provider bills.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from distill_ray.testing.fake_teacher import FakeTeacher, FakeTeacherConfig
from tests.conftest import ROOT
from tests.helpers.models import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.multinode
KEY_ENV = "DISTILL_TEST_TEACHER_KEY"
SERVE_TOKEN_ENV = "DISTILL_TEST_SERVE_TOKEN"
ADMIN_TOKEN_ENV = "DISTILL_TEST_ADMIN_TOKEN"


def _helper():
    spec = importlib.util.spec_from_file_location("local_head", ROOT / "cluster" / "local_head.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + w1 + w2; stopped (exactly those processes) at the end."""
    head = _helper()
    state_dir = tmp_path_factory.mktemp("cluster")
    os.environ.setdefault(SERVE_TOKEN_ENV, "multinode-serve-token-not-a-secret")  # the nodes inherit it
    os.environ.setdefault(ADMIN_TOKEN_ENV, "multinode-admin-token-not-a-secret")
    base = ["--state-dir", str(state_dir)]
    assert head.main(["start", *base, "--workers", "2", "--num-cpus", "1", "--worker-cpus", "2",
                      "--auth", "disabled", "--cwd", str(ROOT)]) == 0
    state = json.loads((state_dir / "head.json").read_text())
    try:
        yield {"helper": head, "base": base, "state": state, "gcs": state["gcs_address"]}
    finally:
        assert head.main(["stop", *base]) == 0


def _nodes(cluster, alive_only: bool = True) -> dict[str, str]:
    """node id -> node name (head, w1, w2) of the live nodes (or of every node that joined)."""
    return {n["node_id"]: n["name"] for n in cluster["helper"].list_nodes(cluster["state"])
            if n["state"] == "ALIVE" or not alive_only}


def _ensure_all_nodes(cluster) -> None:
    alive = set(_nodes(cluster).values())
    for name in ("w1", "w2"):
        if name not in alive:
            assert cluster["helper"].main(["restart-node", name, *cluster["base"]]) == 0


def _cli(cluster, *args: str, timeout: float = 600, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"  # as the test cluster was started
    command = [sys.executable, "-m", "distill_ray", *args, "--address", cluster["gcs"]]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _prompt_config(tmp_path: Path, n: int, base_url: str, **teacher) -> tuple[Path, Path]:
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"text": f"Hello, order ORD-{200000 + i} ({i} items) is {i + 2} days late",
                                       "category": ["shipping", "refund", "billing"][i % 3]}) + "\n" for i in range(n)))
    workdir = tmp_path / "run"
    t = {"name": "fake", "base_url": base_url, "model": "fake-teacher", "api_key_env": KEY_ENV,
         "requests_per_minute": 60000, "max_concurrency": 16, "max_retries": 6, "retry_backoff_s": 0.05,
         "timeout_s": 5, "max_tokens": 16, "price_per_1m_input_tokens": 1000.0, "price_per_1m_output_tokens": 2000.0,
         **teacher}
    config = {"name": "multinode", "workdir": str(workdir),
              "task": {"instructions": "Reply with the order number or NONE.", "metric": "normalized_match"},
              "prompts": {"source": str(log), "dedupe": "exact", "holdout_fraction": 0.1, "min_per_category": 1,
                          "holdout_min_per_category": 1},
              "teachers": [t], "generate": {"num_workers": 4, "batch_size": 4, "progress_every_s": 2}}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config))
    return path, workdir


def _calls_by_node(workdir: Path, cluster) -> Counter:
    report = json.loads((workdir / "teacher" / "report.json").read_text())
    names = {node_id[:12]: name for node_id, name in _nodes(cluster, alive_only=False).items()}
    return Counter({names.get(k, k): v for k, v in report["teachers"]["fake"]["calls_by_node"].items()})


def test_one_rate_limit_for_the_whole_cluster_and_calls_on_every_node(cluster, tmp_path):
    """1,200 requests/min for the cluster: 4 workers on 3 nodes answer at 0.95-1.0 of it together."""
    rpm, n = 1200, 300
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV], latency_s=0.05)) as teacher:
        config, workdir = _prompt_config(tmp_path, n, teacher.base_url, requests_per_minute=rpm)
        _cli(cluster, "prompts", str(config))
        out = _cli(cluster, "generate", str(config))
        stats = teacher.stats()
    stamps = sorted(stats["answered_timestamps"])
    per_s = rpm / 60
    # Never above the limit: the limiter is a token bucket holding 1 s of requests, so any stretch of
    # T seconds may hold at most per_s * T answers plus that 1 s (+1 for the stretch's first answer).
    excess = max(j - i + 1 - per_s * (stamps[j] - stamps[i]) for i in range(len(stamps))
                 for j in range(i, len(stamps)))
    # At the limit: once the workers on every node are up (past the first fifth of the answers), the
    # answered rate is at least 0.95 of it.
    steady = stamps[len(stamps) // 5:]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    print(f"\n{len(stamps)} answers, steady rate {rate * 60:.0f}/min for a limit of {rpm}/min "
          f"({rate / per_s:.3f}); largest excess over the limit in any stretch: {excess:.1f} answers "
          f"(the bucket holds {per_s:.0f}); calls by node {dict(_calls_by_node(workdir, cluster))}")
    # Answers are stamped, not sends: the server's latency jitter (~0.1 s under load here) may bunch
    # up to per_s / 10 more answers into a stretch than were sent in it.
    assert excess <= per_s * 1.1 + 1, excess
    assert rate >= 0.95 * per_s, rate * 60
    assert stats["by_kind"].get("rate_limited", 0) == 0 and set(stats["billed_per_prompt"].values()) == {1}
    by_node = _calls_by_node(workdir, cluster)
    assert len(set(by_node) - {"driver"}) >= 2, by_node  # the workers spread over the nodes
    assert sum(by_node.values()) == len(stamps)
    assert "calls by node" in out.stdout


def test_a_worker_node_killed_during_generate_loses_no_prompt_and_pays_once(cluster, tmp_path):
    _ensure_all_nodes(cluster)
    n = 160
    # 1 s per answer: requests are in flight on w1 when it dies. The fake bills as a provider does:
    # every request, abandoned ones too, an Idempotency-Key notwithstanding.
    fake = FakeTeacherConfig(api_key=os.environ[KEY_ENV], latency_s=1.0, bill_abandoned=True,
                             honour_idempotency_key=False)
    with FakeTeacher(fake) as teacher:
        config, workdir = _prompt_config(tmp_path, n, teacher.base_url, max_concurrency=8)
        text = json.loads(config.read_text())
        text["generate"].update({"lease_ttl_s": 5, "stall_timeout_s": 120})
        config.write_text(json.dumps(text))
        _cli(cluster, "prompts", str(config))
        process = _cli(cluster, "generate", str(config), wait=False)
        try:
            deadline = time.monotonic() + 120
            while teacher.stats()["answered"] < n // 4:
                assert process.poll() is None and time.monotonic() < deadline, "generate ended before the kill"
                time.sleep(0.1)
            assert cluster["helper"].main(["kill-node", "w1", *cluster["base"]]) == 0
            killed_at = teacher.stats()["answered"]
            output, _ = process.communicate(timeout=400)
        finally:
            if process.poll() is None:
                process.kill()
        stats = teacher.stats()
    assert process.returncode == 0, output[-3000:]
    rows = [json.loads(line) for line in _answer_rows(workdir)]
    assert len(rows) == n and all(r["error"] is None for r in rows)  # every prompt answered once
    # Each prompt billed once, except what was in flight on w1 when it died: asked again, and billed again.
    # Answers w1 had finished are not asked again, though Ray Data re-runs its batches elsewhere.
    twice = [key for key, count in stats["billed_per_prompt"].items() if count > 1]
    abandoned = stats["by_kind"].get("abandoned", 0)
    ledger = json.loads((workdir / "teacher" / "report.json").read_text())["teachers"]["fake"]["ledger"]
    by_node = _calls_by_node(workdir, cluster)
    print(f"\nkilled w1 after {killed_at} answers: {n} rows; in flight at the kill {abandoned}, billed twice "
          f"{len(twice)}; the ledger reclaimed {ledger['expired_slots']} slots of {ledger['expired_holders']} dead "
          f"workers and {ledger['reclaimed']} answer keys they had claimed (sent or not), skipped "
          f"{ledger['skipped_answered']} answered ones in re-run batches; requests {stats['requests']}; answers by node "
          f"{dict(by_node)}")
    assert len(stats["billed_per_prompt"]) == n and set(stats["billed_per_prompt"].values()) <= {1, 2}
    assert len(twice) <= abandoned <= 8  # at most max_concurrency were in flight
    assert "w1" not in _nodes(cluster).values()  # w1 is dead: the others finished its share


def _answer_rows(workdir: Path):
    import pyarrow.parquet as pq

    table = pq.read_table(workdir / "teacher" / "answers")
    return [json.dumps({"id": r["id"], "error": r["error"]}) for r in table.to_pylist()]


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory) -> Path:
    """A 2-layer Llama (the shared test helper's), saved as a base model every node can read."""
    folder = tmp_path_factory.mktemp("tiny-student")
    tokenizer = tiny_tokenizer()
    tiny_model(len(tokenizer), tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_train_spreads_two_deepspeed_workers_over_two_nodes_then_serve_survives_a_node(cluster, tmp_path,
                                                                                       tiny_student):
    """Train (ZeRO-2, STRICT_SPREAD: rank 0 and rank 1 on different nodes), then serve that student with
    a replica on each worker node (the router on the head) and kill one node under traffic."""
    _ensure_all_nodes(cluster)
    with FakeTeacher(FakeTeacherConfig(api_key=os.environ[KEY_ENV])) as teacher:
        config, workdir = _prompt_config(tmp_path, 60, teacher.base_url)
        text = json.loads(config.read_text())
        text["students"] = [{"name": "mini", "base_model": str(tiny_student)}]
        text["train"] = {"num_workers": 2, "placement_strategy": "STRICT_SPREAD", "deepspeed": {"zero_stage": 2},
                         "epochs": 1, "batch_size": 8, "max_steps": 4, "eval_every_steps": 4, "eval_sample_size": 4,
                         "max_seq_len": 128}
        port = _free_port()
        text["serve"] = {"student": "mini", "mode": "full", "min_confidence": -1000, "latency_budget_ms": 5000,
                         "num_replicas": 2, "proxy_location": "HeadOnly",
                         "router_resources": {"node_head": 0.01}, "student_resources": {"worker_node": 1},
                         "port": port, "auth_token_env": SERVE_TOKEN_ENV, "admin_token_env": ADMIN_TOKEN_ENV,
                         "skip_eval_gate": True}
        config.write_text(json.dumps(text))
        for step in ("prompts", "generate", "filter", "train"):
            out = _cli(cluster, step, str(config))
        manifest = json.loads((workdir / "students" / "mini" / "manifest.json").read_text())
        nodes = _nodes(cluster)
        placed = [nodes.get(n, n) for n in manifest["result"]["worker_nodes"]]
        print(f"\ntrain: rank 0 on {placed[0]}, rank 1 on {placed[1]}")
        assert len(set(placed)) == 2 and "workers ran on 2 nodes" in out.stdout
        assert (workdir / "students" / "mini" / "best" / "config.json").exists()

        _cli(cluster, "serve", str(config), "--detach")
        try:
            replicas = _replica_nodes(cluster)
            assert sorted(replicas) == ["w1", "w2"], replicas
            answers = asyncio.run(_traffic(port, seconds=40, kill_after_s=10, kill=lambda: cluster["helper"].main(
                ["kill-node", "w2", *cluster["base"]])))
        finally:
            _cli(cluster, "serve", str(config), "--stop")
    before = Counter((status, who) for t, status, who in answers if t < 10)
    after = Counter((status, who) for t, status, who in answers if t >= 10)
    print(f"serve: before the kill {dict(before)}; after w2 died {dict(after)}")
    assert all(status == 200 for _, status, _ in answers)  # no request failed
    assert before[(200, "student")] > 0
    # the replica on w1 keeps answering (the teacher takes what was in flight on w2)
    assert sum(1 for t, _, who in answers if t >= 20 and who == "student") > 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica_nodes(cluster) -> list[str]:
    """The node of each running student replica (from the head's state API)."""
    import urllib.request

    url = cluster["state"]["address"] + "/api/v0/actors?limit=10000&detail=true"
    with urllib.request.urlopen(url, timeout=10) as resp:
        actors = json.loads(resp.read())["data"]["result"]["result"]
    nodes = _nodes(cluster)
    return [nodes.get(a["node_id"], a["node_id"]) for a in actors
            if a.get("state") == "ALIVE" and a.get("class_name") == "ServeReplica:distill:student"]


async def _traffic(port: int, seconds: float, kill_after_s: float, kill) -> list[tuple[float, int, str | None]]:
    """8 clients, one request at a time each, for `seconds`; `kill` runs once after `kill_after_s`.
    Returns (seconds since the start when the answer came, status, x-served-by) per request."""
    out: list[tuple[float, int, str | None]] = []
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {os.environ[SERVE_TOKEN_ENV]}"}

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        n = 0
        while time.monotonic() - start < seconds and n < 2000:
            n += 1
            body = {"model": "m", "messages": [{"role": "user", "content": f"client {i}: ORD-3{n:05d}?"}],
                    "user": f"mn-{i}-{n}", "max_tokens": 4}
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers) as r:
                await r.read()
                out.append((time.monotonic() - start, r.status, r.headers.get("x-served-by")))

    async def killer() -> None:
        await asyncio.sleep(kill_after_s)
        await asyncio.get_running_loop().run_in_executor(None, kill)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(killer(), *(client(i, session) for i in range(8)))
    return out
