"""`distill-ray submit`: validate a config here, then run its steps as one Ray job on a cluster.

What is sent (`plan` builds it; nothing is sent before every check passed):
- a working_dir staged in a temp dir with only what the job needs: the `distill_ray` package (unless
  a built wheel goes as `py_modules`), `jobs/` (entry points, example configs and data),
  `pyproject.toml`, and the user's config file under `submitted/` — never the repository root as
  is, so a stray `.env`, `.venv` or workdir is not uploaded;
- the entrypoint: `python jobs/<step>.py submitted/<config> [-o k=v ...]` for one step,
  `python jobs/run.py ... --steps a,b` for several (one job, the steps in order);
- entrypoint GPUs from the step registry (train/eval with `train.use_gpu`);
- a readable submission id: `<config name>-<steps>-<UTC time>-<4 hex>`;
- env_vars with no secret: teachers' keys stay on the cluster (a Kubernetes secret, or the head's
  environment) and the job reads them from the variables the config names. Before sending, every
  value of those variables set here, and the Ray auth token, is looked for in what would be sent;
  a match refuses the submission.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distill_ray import __version__
from distill_ray.config import ConfigError, PipelineConfig, Problem, load_config, masked
from distill_ray.steps import STEPS, parse_steps
from distill_ray.submit.client import ClusterError, auth_token, is_local, resolve_address

ROOT = Path(__file__).resolve().parents[2]
UPLOAD = ("distill_ray", "jobs", "pyproject.toml")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".DS_Store")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)
MAX_UPLOAD_BYTES = 100 * 2**20  # Ray refuses working_dirs over 500 MB; data belongs on S3 long before


class SubmitOptions(BaseModel):
    """What `distill-ray submit` was asked, besides the config."""

    model_config = ConfigDict(extra="forbid")

    config_path: Path
    overrides: list[str] = Field(default_factory=list)
    steps: str | None = None
    address: str | None = None
    wheel: Path | None = Field(None, description="A built distill-ray wheel sent as py_modules (then the "
                               "package itself is not uploaded).")
    pip: list[str] = Field(default_factory=list, description="pip requirements installed for the job.")
    env: list[str] = Field(default_factory=list, description="NAME=VALUE non-secret env vars for the job.")
    entrypoint_gpus: float | None = Field(None, ge=0, description="Overrides the registry's GPUs for the driver.")
    python: str | None = Field(None, description="Interpreter on the cluster; default: `python` (this "
                               "interpreter for a head on this machine without pip/wheel).")
    submission_id: str | None = None


class JobPlan(BaseModel):
    """Everything sent to the Jobs API (the working_dir as a local path, uploaded by Ray)."""

    submission_id: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    entrypoint_num_gpus: float | None
    secret_env_names: list[str]
    warnings: list[str]


def _problem(key: str, message: str) -> ConfigError:
    return ConfigError([Problem(key=key, message=message)])


def secret_env_names(config: PipelineConfig) -> list[str]:
    """The environment variables the config names for secrets (`*_env` keys), in order, once each."""
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key.endswith("_env") and isinstance(value, str) and value not in names:
                    names.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(config.model_dump(mode="json"))
    return names


def _check_no_credentials_in_urls(config: PipelineConfig) -> None:
    data = config.model_dump(mode="json", by_alias=True)
    if masked(data) != data:
        raise _problem("teachers.base_url / prompts.source / workdir",
                       "a URL carries credentials (user:password@ or a key= parameter); they would travel "
                       "with the job. Put the key in an environment variable on the cluster and name it in "
                       "api_key_env")


def _env_vars(pairs: list[str], secret_names: list[str]) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise _problem("--env", f"'{pair}' is not NAME=VALUE")
        if name in secret_names or SECRET_NAME.search(name):
            raise _problem("--env", f"{name} looks like a secret: secrets are never sent with a job. Create it on "
                           f"the cluster (a Kubernetes secret exposed as {name}) and name it in the config")
        env[name] = value
    return env


def _submission_id(config: PipelineConfig, steps: list[str]) -> str:
    what = "-".join(steps) if len(steps) <= 3 else "run"
    return f"{config.name}-{what}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def _warnings(config: PipelineConfig, steps: list[str], local: bool) -> list[str]:
    notes = []
    if not local and "://" not in config.workdir:
        notes.append(f"workdir '{config.workdir}' is a local path: on a cluster the job writes it on the node "
                     f"that runs it. Use -o workdir=s3://bucket/prefix to keep the artifacts")
    if not local and "prompts" in steps and any("://" not in s for s in _sources(config)):
        notes.append("prompts.source is a local path: the cluster reads it there (jobs/ is uploaded; other "
                     "data belongs on S3)")
    return notes


def _sources(config: PipelineConfig) -> list[str]:
    source = config.prompts.source
    return [source] if isinstance(source, str) else list(source)


def plan(options: SubmitOptions, check_inputs=None) -> tuple[PipelineConfig, JobPlan]:
    """Validate everything here and build the job (staging nothing yet).

    Args:
        options: the command line.
        check_inputs: the same input checks as `validate` (prompts.source exists), run when the
            prompts step is submitted.

    Raises:
        ConfigError: a bad config, step list, option or a secret about to be sent (exit 2).
        ClusterError: no address.
    """
    config = load_config(options.config_path, options.overrides)
    try:
        steps = parse_steps(options.steps)
    except ValueError as exc:
        raise _problem("--steps", str(exc)) from None
    if check_inputs is not None and "prompts" in steps and (problems := check_inputs(config)):
        raise ConfigError(problems)
    _check_no_credentials_in_urls(config)
    if options.wheel is not None and not options.wheel.is_file():
        raise _problem("--wheel", f"{options.wheel}: no such file (build it with: python -m build --wheel)")
    address = resolve_address(options.address)
    local = is_local(address)
    names = secret_env_names(config)
    runtime_env: dict[str, Any] = {"env_vars": _env_vars(options.env, names)}
    if options.pip:
        runtime_env["pip"] = list(options.pip)
    if options.wheel is not None:
        runtime_env["py_modules"] = [str(options.wheel.resolve())]
    python = options.python or (sys.executable if local and not options.pip and not options.wheel else "python")
    config_arg = f"submitted/{options.config_path.name}"
    args = [config_arg, *[part for o in options.overrides for part in ("-o", o)]]
    if len(steps) == 1:
        command = [python, STEPS[steps[0]].script, *args]
    else:
        command = [python, "jobs/run.py", *args, "--steps", ",".join(steps)]
    gpus = options.entrypoint_gpus
    if gpus is None:
        gpus = max(STEPS[s].entrypoint_gpus(config) for s in steps)
    job = JobPlan(
        submission_id=options.submission_id or _submission_id(config, steps),
        entrypoint=shlex.join(command),
        runtime_env=runtime_env,
        metadata={"distill_ray_config": config.name, "steps": ",".join(steps), "distill_ray_version": __version__,
                  "secret_env_names": ",".join(names)},
        entrypoint_num_gpus=gpus or None,
        secret_env_names=names,
        warnings=_warnings(config, steps, local),
    )
    return config, job


def stage(options: SubmitOptions, into: Path) -> Path:
    """Copy what the job needs into `into` (the working_dir Ray uploads); returns it."""
    for name in UPLOAD:
        if name == "distill_ray" and options.wheel is not None:
            continue
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=IGNORE)
        elif source.is_file():
            shutil.copy2(source, into / name)
    (into / "submitted").mkdir()
    shutil.copy2(options.config_path, into / "submitted" / options.config_path.name)
    size = sum(p.stat().st_size for p in into.rglob("*") if p.is_file())
    if size > MAX_UPLOAD_BYTES:
        raise _problem("jobs/", f"the job's files add up to {size / 2**20:.0f} MB: move data to S3 and name it "
                       f"in prompts.source")
    return into


def _secret_values(job: JobPlan, address: str) -> list[tuple[str, str]]:
    values = [(name, os.environ[name]) for name in job.secret_env_names if len(os.environ.get(name, "")) >= 6]
    if token := auth_token(address):
        values.append(("the Ray auth token", token))
    return values


def refuse_if_secrets_sent(job: JobPlan, working_dir: Path, address: str) -> None:
    """Raise if the value of a secret set here appears in anything about to be sent.

    Raises:
        ConfigError: naming the variable (never its value) and where it was found.
    """
    sent = json.dumps([job.entrypoint, job.runtime_env, job.metadata])
    files = [p for p in working_dir.rglob("*") if p.is_file()]
    for name, value in _secret_values(job, address):
        if value in sent:
            raise _problem("runtime_env", f"the value of {name} would be sent with the job; refusing")
        for path in files:
            if value.encode() in path.read_bytes():
                raise _problem(str(path.relative_to(working_dir)),
                               f"this file holds the value of {name} and would be uploaded; refusing")


def _submit_job(client, job: JobPlan, runtime_env: dict[str, Any], address: str, wait_s: float = 60) -> str:
    """Submit, waiting out a head whose job agent is still starting (Ray answers 500 'No available agent')."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(
                entrypoint=job.entrypoint, submission_id=job.submission_id, runtime_env=runtime_env,
                metadata=job.metadata, entrypoint_num_gpus=job.entrypoint_num_gpus)
        except RuntimeError as exc:
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise ClusterError(f"the cluster at {address} refused the job: {exc}") from exc


def submit(options: SubmitOptions, check_inputs=None, echo=print) -> tuple[Any, str]:
    """Validate, stage, check for secrets, then submit; returns (client, submission id).

    Raises:
        ConfigError: anything wrong on this side (nothing was sent).
        ClusterError: the cluster could not be reached or refused us.
    """
    from distill_ray.submit.client import connect

    _, job = plan(options, check_inputs)
    address = resolve_address(options.address)
    with tempfile.TemporaryDirectory(prefix="distill-ray-job-") as tmp:
        working_dir = stage(options, Path(tmp))
        refuse_if_secrets_sent(job, working_dir, address)
        client = connect(address)
        for note in job.warnings:
            echo(f"warning: {note}")
        runtime_env = {**job.runtime_env, "working_dir": str(working_dir)}
        submission_id = _submit_job(client, job, runtime_env, address)
    secrets_note = (f"; secrets stay on the cluster, in the variables the config names: "
                    f"{', '.join(job.secret_env_names)} (values not sent)" if job.secret_env_names else "")
    echo(f"submitted {submission_id} to {address}: {job.entrypoint}{secrets_note}")
    return client, submission_id
