"""The Ray Jobs API of a cluster: connect (address, Ray 2.60 token auth), list, status, logs, stop, follow.

Token auth: Ray 2.60 clusters started by `ray start` / `ray.init()` require a bearer token, but its
clients only send one when RAY_AUTH_MODE=token. We send it ourselves, from (in order)
RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH names, or, for a head on this machine only,
~/.ray/auth_token (never to a remote address, so a local token does not leak to another cluster).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

from distill_ray.errors import BadInput

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class ClusterError(BadInput):
    """The cluster address is missing or unreachable, refuses us, or does not know the job (exit 2)."""


def resolve_address(address: str | None) -> str:
    """`--address`, else RAY_ADDRESS, as an http(s) URL of the Jobs API (the dashboard port).

    Raises:
        ClusterError: when neither is given.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS "
                           "(`python cluster/local_head.py start` prints it for a local head)")
    return address if "://" in address else f"http://{address}"


def is_local(address: str) -> bool:
    return (urlparse(address).hostname or "") in LOCAL_HOSTS


def auth_token(address: str) -> str | None:
    """The Ray auth token to send to `address`, or None (see the module docstring for the order)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            return Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({exc.strerror})") from exc
    home_token = Path.home() / ".ray" / "auth_token"
    if is_local(address) and home_token.is_file():
        return home_token.read_text().strip()
    return None


def connect(address: str | None):
    """A JobSubmissionClient for the cluster, with the auth token when there is one.

    Raises:
        ClusterError: the address is missing or unreachable, or the cluster refuses the token.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = auth_token(url)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as exc:
        raise ClusterError(_auth_advice(url, token)) from exc
    except ConnectionError as exc:
        raise ClusterError(f"cannot reach the Ray Jobs API at {url} (is the head up, and is this its "
                           f"dashboard port, 8265 by default?)") from exc


def _auth_advice(url: str, token: str | None) -> str:
    what = "refused our token" if token else "requires a Ray auth token and none was found"
    return (f"the cluster at {url} {what}. Point RAY_AUTH_TOKEN_PATH at the cluster's token file, or set "
            f"RAY_AUTH_TOKEN (KubeRay: the token secret of the RayCluster; a head from cluster/local_head.py: "
            f'eval "$(python cluster/local_head.py env)")')


def call(func, *args, job_id: str | None = None):
    """Run a client call, turning Ray's errors for a missing job into a ClusterError."""
    try:
        return func(*args)
    except RuntimeError as exc:
        if job_id and ("does not exist" in str(exc) or "404" in str(exc)):
            raise ClusterError(f"no job '{job_id}' on this cluster (`distill-ray jobs list` shows them)") from exc
        raise ClusterError(str(exc)) from exc


def describe(job) -> str:
    """One line for a job: id, status, start time, entrypoint."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
    ident = job.submission_id or job.job_id
    return f"{ident:<52} {str(job.status.value if hasattr(job.status, 'value') else job.status):<10} {started}  {job.entrypoint}"


def wait_until_done(client, job_id: str, poll_s: float = 1.0):
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns its JobDetails."""
    while True:
        info = call(client.get_job_info, job_id, job_id=job_id)
        if str(info.status) in TERMINAL or getattr(info.status, "value", None) in TERMINAL:
            return info
        time.sleep(poll_s)


def follow(client, job_id: str, out: TextIO = sys.stdout) -> int:
    """Print the job's logs as they come (as `ray job submit` does), then its final status; returns
    the exit code to use (see `exit_code`)."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the log stream broke off; the job itself may still be running
        print(f"distill-ray: log stream from the cluster ended early ({exc}); waiting for the job", file=sys.stderr)
    info = wait_until_done(client, job_id)
    return report_final(info, out)


def exit_code(status: str, driver_exit_code: int | None) -> int:
    """0 for SUCCEEDED; for FAILED or STOPPED 1, or 2 when the job's `distill-ray` verb itself exited 2
    (bad input found on the cluster, e.g. a prompts.source missing there)."""
    if status == "SUCCEEDED":
        return 0
    return 2 if driver_exit_code == 2 else 1


def report_final(info, out: TextIO = sys.stdout) -> int:
    status = getattr(info.status, "value", str(info.status))
    code = exit_code(status, info.driver_exit_code)
    # Ray's message for a failed entrypoint repeats the log's tail, which `follow` has just printed.
    message = (info.message or "").split(", last available logs")[0].strip()
    message = f": {message}" if message and status != "SUCCEEDED" else ""
    print(f"job {info.submission_id or info.job_id}: {status} (exit code {code}){message}", file=out)
    return code
