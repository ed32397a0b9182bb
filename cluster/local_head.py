#!/usr/bin/env python3
"""A local Ray cluster on 127.0.0.1 for development — a head, and worker nodes if asked — started
and stopped exactly: nothing else of the user's is touched.

    python cluster/local_head.py start            # prints the exports for `distill-ray submit`
    python cluster/local_head.py start --workers 2 --num-cpus 2 --worker-cpus 2   # a 3-node cluster
    eval "$(python cluster/local_head.py env)"    # RAY_ADDRESS and RAY_AUTH_TOKEN_PATH in this shell
    distill-ray submit jobs/configs/support_orders.yaml --steps prompts
    python cluster/local_head.py nodes            # the nodes, alive or dead, with their resources
    python cluster/local_head.py kill-node w1     # SIGKILL worker node w1's raylet (a node failure)
    python cluster/local_head.py restart-node w1  # a new node w1 joins
    python cluster/local_head.py stop

Every node has a custom resource of its own (`node_head`, `node_w1`, `node_w2`, ...): a task or
actor asking for `{"node_w1": 0.01}` lands there, and placement is visible in `ray status`. Worker
nodes also have one `worker_node` each: asking for it keeps a replica off the head.

Why not plain `ray start --head` / `ray stop`: `ray stop` kills every Ray process of the user
(another project's cluster, a test's Ray, a notebook's), and a second head collides with the first
on Ray's default ports. This script
- runs `ray start --head --block` as the leader of a new session, so every process of this head
  (GCS, raylet, dashboard, agents, workers) carries that session id, and `stop` signals only the
  processes of that session (plus any that name this head's temp dir), nothing else;
- picks free ports for every listener, binds them to 127.0.0.1 and keeps Ray's session files in a
  temp dir of its own;
- turns on Ray 2.60's token auth with a fresh token in the state dir (mode 0600), pointed at with
  RAY_AUTH_TOKEN_PATH, so it neither reads nor overwrites ~/.ray/auth_token.

Worker nodes are `ray start --address` processes, each the leader of a session of its own (so a
node can be killed alone, as a machine would die), on free ports, with a temp dir of its own.

The state (pids, ports, token) lives in `--state-dir` (default `.cache/local-head` in the
repository, or $DISTILL_HEAD_DIR). The head inherits this shell's environment: export the teacher's
API key variable (the one `api_key_env` names) before `start`, as a cluster gets it from a secret.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port",
              "--object-manager-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--metrics-export-port", "--runtime-env-agent-port")
# A worker node's own listeners (two nodes on one machine collide on Ray's default ports).
WORKER_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                     "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (held open together so none is handed out twice)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ray_binary() -> str:
    beside_python = Path(sys.executable).with_name("ray")
    found = str(beside_python) if beside_python.exists() else shutil.which("ray")
    if not found:
        sys.exit("local_head: the `ray` command is not installed (pip install 'ray[default]')")
    return found


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or os.environ.get("DISTILL_HEAD_DIR") or ROOT / ".cache" / "local-head").resolve()


def _read_state(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / "head.json").read_text())
    except FileNotFoundError:
        return None


def _exports(state: dict) -> str:
    lines = [f"export RAY_ADDRESS={state['address']}"]
    if state.get("token_path"):
        lines.append(f"export RAY_AUTH_TOKEN_PATH={state['token_path']}")
    return "\n".join(lines)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_for_jobs_api(address: str, token: str | None, leader: subprocess.Popen, timeout_s: float) -> None:
    """Wait until the Jobs API answers (the dashboard starts last), or the head died."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if leader.poll() is not None:
            raise RuntimeError(f"`ray start` exited with code {leader.returncode}")
        try:
            with urllib.request.urlopen(urllib.request.Request(address + "/api/jobs/", headers=headers), timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise RuntimeError(f"the Jobs API at {address} did not answer within {timeout_s:.0f} s")


def start(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    state = _read_state(state_dir)
    if state and _is_running(state["pid"]):
        print(f"local_head: already running (pid {state['pid']}); `stop` it first", file=sys.stderr)
        print(_exports(state))
        return 0
    state_dir.mkdir(parents=True, exist_ok=True)
    # Ray's unix sockets live under the temp dir and paths are limited to ~107 bytes: keep it short.
    temp_dir = tempfile.mkdtemp(prefix="ray-head-", dir="/tmp")
    ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
    token = None
    token_path = None
    if args.auth == "token":
        token = secrets.token_hex(32)
        token_path = state_dir / "auth_token"
        token_path.write_text(token)
        token_path.chmod(0o600)
    env = _node_env(str(token_path) if token_path else None)
    command = [_ray_binary(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--temp-dir", temp_dir, "--num-cpus", str(args.num_cpus),
               "--disable-usage-stats", "--resources", json.dumps({"node_head": 1})]
    if args.num_gpus is not None:
        command += ["--num-gpus", str(args.num_gpus)]
    for flag, port in ports.items():
        command += [flag, str(port)]
    log = open(state_dir / "head.log", "w")  # noqa: SIM115 - kept open by the child
    # start_new_session: the head's processes form a session of their own, so `stop` can find them all.
    leader = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True, cwd=args.cwd or os.getcwd())
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    state = {"pid": leader.pid, "address": address, "gcs_address": f"127.0.0.1:{ports['--port']}",
             "temp_dir": temp_dir, "token_path": str(token_path) if token_path else None, "ports": ports,
             "auth": args.auth, "workers": {}}
    (state_dir / "head.json").write_text(json.dumps(state, indent=2))
    try:
        _wait_for_jobs_api(address, token, leader, args.timeout_s)
        for i in range(1, args.workers + 1):
            _start_worker(state_dir, state, f"w{i}", args.worker_cpus, env, args.cwd)
        _wait_for_nodes(state, 1 + args.workers, args.timeout_s)
    except RuntimeError as exc:
        print(f"local_head: {exc}; see the logs in {state_dir}", file=sys.stderr)
        _stop_state(state_dir, state)
        return 1
    workers = f" and {args.workers} worker nodes ({', '.join(state['workers'])})" if args.workers else ""
    print(f"# local Ray head up{workers}: Jobs API and dashboard {address}, GCS {state['gcs_address']}, "
          f"auth {args.auth}; stop with: python cluster/local_head.py stop", file=sys.stderr)
    print(_exports(state))
    return 0


def _node_env(token_path: str | None) -> dict[str, str]:
    """The environment of every node's processes: this shell's, with the cluster's auth settings."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    if token_path:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token_path)
    else:
        env["RAY_AUTH_MODE"] = "disabled"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    return env


def _start_worker(state_dir: Path, state: dict, name: str, num_cpus: int, env: dict[str, str],
                  cwd: str | None) -> None:
    """`ray start --address` for one worker node, the leader of a session of its own."""
    temp_dir = tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp")
    ports = dict(zip(WORKER_PORT_FLAGS, _free_ports(len(WORKER_PORT_FLAGS)), strict=True))
    command = [_ray_binary(), "start", "--address", state["gcs_address"], "--block", "--node-ip-address", "127.0.0.1",
               "--temp-dir", temp_dir, "--num-cpus", str(num_cpus), "--disable-usage-stats",
               "--resources", json.dumps({f"node_{name}": 1, "worker_node": 1})]
    for flag, port in ports.items():
        command += [flag, str(port)]
    log = open(state_dir / f"{name}.log", "w")  # noqa: SIM115 - kept open by the child
    leader = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              start_new_session=True, cwd=cwd or os.getcwd())
    state["workers"][name] = {"pid": leader.pid, "temp_dir": temp_dir, "ports": ports, "resource": f"node_{name}",
                              "num_cpus": num_cpus, "cwd": cwd}
    (state_dir / "head.json").write_text(json.dumps(state, indent=2))


def list_nodes(state: dict) -> list[dict]:
    """The cluster's nodes from the head's state API: name (by custom resource), id, state, CPUs."""
    headers = {}
    if state.get("token_path"):
        headers["Authorization"] = f"Bearer {Path(state['token_path']).read_text().strip()}"
    request = urllib.request.Request(state["address"] + "/api/v0/nodes?limit=1000&detail=true", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        rows = json.loads(resp.read())["data"]["result"]["result"]
    out = []
    for row in rows:
        resources = row.get("resources_total") or {}
        name = next((k[len("node_"):] for k in resources if k.startswith("node_") and not k.startswith("node:")), "?")
        out.append({"name": name, "node_id": row["node_id"], "state": row["state"], "cpus": resources.get("CPU", 0)})
    return sorted(out, key=lambda n: (n["name"] != "head", n["name"], n["state"]))


def _wait_for_nodes(state: dict, count: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    alive: list[dict] = []
    while time.monotonic() < deadline:
        try:
            alive = [n for n in list_nodes(state) if n["state"] == "ALIVE"]
        except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError):
            alive = []
        if len(alive) >= count:
            return
        for name, worker in state["workers"].items():
            if not _is_running(worker["pid"]):
                raise RuntimeError(f"worker node {name}: `ray start` exited")
        time.sleep(0.5)
    raise RuntimeError(f"{len(alive)} of {count} nodes came up within {timeout_s:.0f} s")


def _session_processes(sid: int, temp_dir: str) -> list[int]:
    """PIDs of this head: those in its session, or whose command line names its temp dir."""
    me = os.getuid()
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if entry.stat().st_uid != me:
                continue
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, waiting for its parent to reap it
            in_session = os.getsid(pid) == sid
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if in_session or temp_dir in cmdline:
            found.append(pid)
    if not Path("/proc").is_dir():  # macOS: ask ps for the session of every process
        out = subprocess.run(["ps", "-x", "-o", "pid=,sess=,command="], capture_output=True, text=True).stdout
        for line in out.splitlines():
            pid_text, sess_text, command = (line.split(None, 2) + ["", ""])[:3]
            if pid_text.isdigit() and (sess_text == str(sid) or temp_dir in command):
                found.append(int(pid_text))
    return [pid for pid in found if pid != os.getpid()]


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop_state(state_dir: Path, state: dict, grace_s: float = 5) -> int:
    code = 0
    for worker in state.get("workers", {}).values():  # the workers first: they would try to reconnect
        code |= _stop_session(worker["pid"], worker["temp_dir"], grace_s)
    code |= _stop_session(state["pid"], state["temp_dir"], grace_s)
    (state_dir / "head.json").unlink(missing_ok=True)
    return code


def _stop_session(sid: int, temp_dir: str, grace_s: float) -> int:
    pids = _session_processes(sid, temp_dir)
    _signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (pids := _session_processes(sid, temp_dir)):
        time.sleep(0.2)
    _signal_all(pids, signal.SIGKILL)
    if pids:
        time.sleep(0.5)
    shutil.rmtree(temp_dir, ignore_errors=True)
    left = _session_processes(sid, temp_dir)
    if left:
        print(f"local_head: processes {left} did not exit", file=sys.stderr)
        return 1
    return 0


def stop(args: argparse.Namespace) -> int:
    state_dir = _state_dir(args)
    state = _read_state(state_dir)
    if state is None:
        print(f"local_head: no head recorded in {state_dir}; nothing to stop", file=sys.stderr)
        return 0
    code = _stop_state(state_dir, state)
    print(f"local_head: stopped the head started from {state_dir} (session {state['pid']})", file=sys.stderr)
    return code


def kill_node(args: argparse.Namespace) -> int:
    """SIGKILL a worker node's raylet: the node fails as a machine would (its workers die with it)."""
    state = _read_state(_state_dir(args))
    worker = (state or {}).get("workers", {}).get(args.node or "")
    if worker is None:
        print(f"local_head: no worker node {args.node!r}; nodes: {', '.join((state or {}).get('workers', {}))}",
              file=sys.stderr)
        return 2
    raylets = [pid for pid in _session_processes(worker["pid"], worker["temp_dir"])
               if "raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[0]]
    _signal_all(raylets, signal.SIGKILL)
    print(f"local_head: killed the raylet of worker node {args.node} (pid {', '.join(map(str, raylets))})",
          file=sys.stderr)
    return 0 if raylets else 1


def restart_node(args: argparse.Namespace) -> int:
    """Bring a worker node back (after kill-node): what is left of it is stopped, a new node with the
    same name and custom resource joins."""
    state_dir = _state_dir(args)
    state = _read_state(state_dir)
    worker = (state or {}).get("workers", {}).get(args.node or "")
    if worker is None:
        print(f"local_head: no worker node {args.node!r}", file=sys.stderr)
        return 2
    _stop_session(worker["pid"], worker["temp_dir"], grace_s=5)
    alive = [n for n in list_nodes(state) if n["state"] == "ALIVE" and n["name"] != args.node]
    _start_worker(state_dir, state, args.node, worker["num_cpus"], _node_env(state.get("token_path")), worker["cwd"])
    try:
        _wait_for_nodes(state, len(alive) + 1, args.timeout_s)
    except RuntimeError as exc:
        print(f"local_head: {exc}; see {state_dir / (args.node + '.log')}", file=sys.stderr)
        return 1
    print(f"local_head: worker node {args.node} is back", file=sys.stderr)
    return 0


def nodes(args: argparse.Namespace) -> int:
    state = _read_state(_state_dir(args))
    if state is None:
        print("local_head: not running; `start` it first", file=sys.stderr)
        return 1
    for n in list_nodes(state):
        print(f"{n['name']:6s} {n['state']:6s} {n['cpus']:g} CPU  {n['node_id']}")
    return 0


def env(args: argparse.Namespace) -> int:
    state = _read_state(_state_dir(args))
    if state is None or not _is_running(state["pid"]):
        print("local_head: not running; `start` it first", file=sys.stderr)
        return 1
    print(_exports(state))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop", "env", "nodes", "kill-node", "restart-node"))
    parser.add_argument("node", nargs="?", help="kill-node / restart-node: the worker node (w1, w2, ...)")
    parser.add_argument("--state-dir", default=None, help="where pids, ports and the token are kept")
    parser.add_argument("--num-cpus", type=int, default=2, help="the head's CPUs")
    parser.add_argument("--workers", type=int, default=0, help="worker nodes to start beside the head")
    parser.add_argument("--worker-cpus", type=int, default=2, help="each worker node's CPUs")
    parser.add_argument("--num-gpus", type=int, default=None)
    parser.add_argument("--auth", choices=("token", "disabled"), default="token",
                        help="Ray token auth (default: on, with a fresh token in the state dir)")
    parser.add_argument("--timeout-s", type=float, default=90)
    parser.add_argument("--cwd", default=None, help="working directory of the head's processes")
    args = parser.parse_args(argv)
    actions = {"start": start, "stop": stop, "env": env, "nodes": nodes, "kill-node": kill_node,
               "restart-node": restart_node}
    return actions[args.action](args)


if __name__ == "__main__":
    sys.exit(main())
