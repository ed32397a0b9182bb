"""The cluster verbs of `distill-ray`: `submit` and `jobs list|status|logs|stop` (registered by cli.py).

Their errors are `ClusterError` (a BadInput: exit 2) or the config's; cli.py reports them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from distill_ray.submit import client as jobs_client

EXAMPLE = "jobs/configs/support_orders.yaml"
ADDRESS_HELP = "the cluster's Jobs API, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS)"


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit, then (like `ray job submit`) stream the job's logs until it ends; --no-wait returns at once."""
    from distill_ray.submit.job import SubmitOptions, submit

    options = SubmitOptions(
        config_path=Path(args.config), overrides=args.overrides, steps=args.steps, address=args.address,
        wheel=Path(args.wheel) if args.wheel else None, pip=args.pip, env=args.env,
        entrypoint_gpus=args.entrypoint_gpus, python=args.python, submission_id=args.submission_id)
    client, submission_id = submit(options, check_inputs=args.check_inputs)
    if args.no_wait:
        print(f"follow it with: distill-ray jobs logs {submission_id} --follow")
        return 0
    try:
        return jobs_client.follow(client, submission_id)
    except KeyboardInterrupt:
        print(f"the job keeps running on the cluster; stop it with: distill-ray jobs stop {submission_id}",
              file=sys.stderr)
        raise


def cmd_jobs(args: argparse.Namespace) -> int:
    client = jobs_client.connect(args.address)
    if args.jobs_verb == "list":
        jobs = sorted(jobs_client.call(client.list_jobs), key=lambda j: j.start_time or 0)
        for job in jobs:
            print(jobs_client.describe(job))
        if not jobs:
            print("no jobs on this cluster yet")
        return 0
    job_id = args.job_id
    if args.jobs_verb == "status":
        info = jobs_client.call(client.get_job_info, job_id, job_id=job_id)
        print(jobs_client.describe(info))
        if info.message:
            print(f"  {info.message}")
        if info.driver_exit_code is not None:
            print(f"  exit code {info.driver_exit_code}")
        return 0
    if args.jobs_verb == "logs":
        if args.follow:
            return jobs_client.follow(client, job_id)
        print(jobs_client.call(client.get_job_logs, job_id, job_id=job_id), end="")
        return 0
    stopped = jobs_client.call(client.stop_job, job_id, job_id=job_id)
    print(f"job {job_id}: {'stop requested' if stopped else 'already finished'}")
    if args.wait:
        return jobs_client.report_final(jobs_client.wait_until_done(client, job_id))
    return 0


def add_cluster_verbs(sub, verb, check_inputs) -> None:
    """Register `submit` (through cli.py's `verb` helper: config and -o) and `jobs`.

    `check_inputs` is `validate`'s check of what the config points at, run before a prompts step is sent.
    """
    submit = verb("submit", cmd_submit, "run steps as one Ray job on a cluster (validated here first), print its "
                  "logs until it ends and exit with its status: 0 SUCCEEDED, 1 FAILED or STOPPED (2 when the "
                  "job itself found bad input)",
                  f"distill-ray submit {EXAMPLE} --steps prompts,generate --address http://127.0.0.1:8265 "
                  f"-o workdir=s3://my-bucket/runs/x", ray_address=False)
    submit.set_defaults(check_inputs=check_inputs)
    submit.add_argument("--steps", default=None, help="comma-separated steps, run in order (default: all)")
    submit.add_argument("--address", default=None, help=ADDRESS_HELP)
    submit.add_argument("--no-wait", action="store_true",
                        help="return once the job is submitted, printing its id and how to follow it")
    submit.add_argument("--follow", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    submit.add_argument("--wheel", default=None, help="send this built distill-ray wheel as py_modules "
                        "instead of uploading the package source")
    submit.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                        help="pip requirement the cluster installs for the job (repeatable); default none: "
                        "the cluster's image carries the dependencies")
    submit.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="a non-secret environment variable for the job (repeatable); secrets are refused")
    submit.add_argument("--entrypoint-gpus", type=float, default=None,
                        help="GPUs for the job's driver (default: 1 for train/eval with train.use_gpu, else 0)")
    submit.add_argument("--python", default=None, help="interpreter on the cluster (default: python)")
    submit.add_argument("--submission-id", default=None, help="default: <name>-<steps>-<UTC time>-<hex>")

    jobs = sub.add_parser("jobs", help="list, inspect, follow and stop the cluster's Ray jobs",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="example:\n  distill-ray jobs list\n  distill-ray jobs logs "
                          "support-orders-prompts-20261128-120000-ab12 --follow")
    jobs_sub = jobs.add_subparsers(dest="jobs_verb", required=True, metavar="ACTION")
    for name, help_text in (("list", "every job, oldest first"), ("status", "a job's status and exit code"),
                            ("logs", "a job's logs"), ("stop", "stop a job")):
        p = jobs_sub.add_parser(name, help=help_text)
        p.add_argument("--address", default=None, help=ADDRESS_HELP)
        if name != "list":
            p.add_argument("job_id", help="the submission id `submit` printed")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="until the job ends; exit with its code")
        if name == "stop":
            p.add_argument("--wait", action="store_true", help="wait until it has stopped")
        p.set_defaults(func=cmd_jobs)
