"""The `distill-ray` command: a thin face over the library.

Exit codes: 0 done; 1 the step ran and failed; 2 bad input (config, data, arguments), with a
message naming the key, file and line, and no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import textwrap
import threading
import time
import typing
from collections.abc import Callable

from distill_ray import __version__
from distill_ray.config import ConfigError, PipelineConfig, Problem, load_config, resolved_yaml
from distill_ray.config.schema import RolloutMode
from distill_ray.errors import BadInput, StepFailed

EXAMPLE = "jobs/configs/support_orders.yaml"


def check_inputs(config: PipelineConfig) -> list[Problem]:
    """Problems with what the config points at (checked by validate and before every step)."""
    from distill_ray.prompts.read import SourceError, check_source

    try:
        check_source(config.prompts)
    except SourceError as exc:
        key, _, message = str(exc).partition(": ")
        return [Problem(key=key, message=message)]
    return []


def _load(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load(args)
    problems = check_inputs(config)
    if problems:
        raise ConfigError(problems)
    print(f"# {args.config}: valid (distill-ray {__version__}); resolved config with defaults, secrets masked")
    print(resolved_yaml(config), end="")
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    """One pipeline step, by its verb (prompts, generate, filter)."""
    config = _load(args)
    _run_steps(config, [args.verb])
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """`train`, or with --bundle the loop's settings and data to run without Ray."""
    if not args.bundle:
        return cmd_step(args)
    from distill_ray.train.step import write_bundles

    write_bundles(_load(args), args.bundle)
    return 0


def _run_steps(config: PipelineConfig, names: list[str], announce: bool = False) -> None:
    """Run steps in order; the config's `launch` teachers serve while steps that call a teacher run."""
    from distill_ray.steps import STEPS
    from distill_ray.teacher.launch import launched_teachers

    calling = {name for name in names if STEPS[name].calls_teacher(config)}
    teachers = launched_teachers(config) if calling else contextlib.nullcontext()
    with teachers as launched:
        for name in names:
            t = time.perf_counter()
            if announce:
                print(f"== {name}")
            if launched is not None and name in calling:
                launched.wait()
            STEPS[name].load()(config)  # imported only when it runs
            if announce:
                print(f"== {name} done in {time.perf_counter() - t:.1f}s")


def cmd_teacher_serve(args: argparse.Namespace) -> int:
    if args.engine == "transformers":
        from distill_ray.teacher.offline import serve

        serve(host=args.host, port=args.port, model_spec=args.model, max_batch=args.max_batch or 8,
              api_key_env=args.api_key_env)
        return 0
    from distill_ray.config.schema import Engine
    from distill_ray.engine.server import serve_teacher

    settings = {"enforce_eager": args.eager} if args.eager is not None else {}
    if args.max_batch:
        settings["max_num_seqs"] = args.max_batch
    return serve_teacher(args.model, host=args.host, port=args.port, name=args.name, engine=Engine(**settings),
                         api_key_env=args.api_key_env)


def cmd_run(args: argparse.Namespace) -> int:
    from distill_ray.steps import parse_steps

    config = _load(args)
    try:
        wanted = parse_steps(args.steps)
    except ValueError as exc:
        raise ConfigError([Problem(key="--steps", message=str(exc))]) from None
    problems = check_inputs(config)
    if problems:
        raise ConfigError(problems)
    print(f"distill-ray run {config.name}: steps {', '.join(wanted)}; workdir {config.workdir}")
    start = time.perf_counter()
    try:
        _run_steps(config, wanted, announce=True)
    finally:
        from distill_ray.summary import summary

        table = summary(config)
        if table:
            print(table)
    print(f"distill-ray run: all steps done in {time.perf_counter() - start:.1f}s")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from distill_ray.serve import step as serving

    config = _load(args)
    if args.stats:
        print(serving.format_stats(serving.fetch_stats(config)) if not args.json
              else json.dumps(serving.fetch_stats(config), indent=2))
        return 0
    if args.stop:
        serving.stop(config)
        return 0
    from distill_ray.teacher.launch import launched_teachers

    needs_launch = bool(config.fallback_teacher.launch)
    with launched_teachers(config) if needs_launch and not args.detach else contextlib.nullcontext() as launched:
        if launched is not None:
            launched.wait()
        serving.run_serve(config, detach=args.detach)
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    from distill_ray.serve.step import rollout

    rollout(_load(args), args.mode, args.percent, args.min_confidence, plan=args.plan)
    return 0


def cmd_drift(args: argparse.Namespace) -> int:
    from distill_ray.drift import run_drift

    config = _load(args)
    report = run_drift(config)
    return 0 if report["verdict"] == "ok" or not args.fail_on_drift else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill-ray",
        description="Distil an OpenAI-compatible teacher LLM into a small student, every step a Ray job.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(f"""\
            example:
              distill-ray validate {EXAMPLE}
              distill-ray run {EXAMPLE} -o prompts.size=500
            Every verb takes -o/--set key.path=value overrides (repeatable) after the config.
            Exit codes: 0 done, 1 a step failed, 2 bad input."""),
    )
    parser.add_argument("--version", action="version", version=f"distill-ray {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, func: Callable[[argparse.Namespace], int], help_text: str, example: str,
             ray_address: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", help="pipeline config (YAML), e.g. " + EXAMPLE)
        p.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a config key (repeatable), e.g. -o prompts.size=500")
        if ray_address:
            p.add_argument("--address", dest="ray_address", default=None, metavar="HOST:PORT",
                           help="run the Ray work on this cluster (its GCS address, or 'auto'); default: "
                           "$RAY_ADDRESS, else a local Ray started for the command")
        p.set_defaults(func=func)
        return p

    verb("validate", cmd_validate, "check a config and print it resolved (defaults filled, secrets masked)",
         f"distill-ray validate {EXAMPLE} -o workdir=s3://my-bucket/runs/x")
    verb("prompts", cmd_step, "step 2: build the deduplicated prompt set with its holdout split from logs",
         f"distill-ray prompts {EXAMPLE} -o prompts.size=1000")
    verb("generate", cmd_step, "step 3a: ask every teacher for every prompt (cached, rate limited, resumable)",
         f"distill-ray generate {EXAMPLE} -o budget_usd=5")
    verb("filter", cmd_step, "step 3b: apply `filters:` to the teacher answers, recording each drop's reason",
         f"distill-ray filter {EXAMPLE}")
    train = verb("train", cmd_train, "steps 4-5: fine-tune each student on the filtered answers (Ray Train + DeepSpeed)",
                 f"distill-ray train {EXAMPLE} -o train.max_steps=20")
    train.add_argument("--bundle", metavar="DIR", help="write each student's training loop to DIR/<student> to run "
                       "without Ray (python -m distill_ray.train.standalone DIR/<student>, or under torchrun), "
                       "instead of training")
    verb("eval", cmd_step, "step 6: each student against the teacher on the holdout, per slice; gate on task.bar",
         f"distill-ray eval {EXAMPLE}")
    verb("replay", cmd_step, "step 7 with traffic: serve the student, replay the held-out prompts in shadow "
         "mode then canary, remove the app", f"distill-ray replay {EXAMPLE}")
    serve = verb("serve", cmd_serve, "step 7: the student behind the safety net on Ray Serve (OpenAI-compatible)",
                 f"distill-ray serve {EXAMPLE}   # then: distill-ray serve {EXAMPLE} --stats")
    serve.add_argument("--detach", action="store_true", help="deploy and return; the app keeps running on the cluster")
    serve.add_argument("--stats", action="store_true", help="print the running app's /v1/distill/stats")
    serve.add_argument("--json", action="store_true", help="with --stats: the raw JSON")
    serve.add_argument("--stop", action="store_true", help="remove a detached app from the cluster")
    roll = verb("rollout", cmd_rollout, "change the live serve app's rollout in place (no restart)",
                f"distill-ray rollout {EXAMPLE} --mode canary --percent 25   # --percent 0: instant rollback")
    roll.add_argument("--mode", choices=typing.get_args(RolloutMode), default=None)
    roll.add_argument("--percent", type=float, default=None, help="canary share of users, 0-100")
    roll.add_argument("--min-confidence", type=float, default=None, help="fallback threshold (mean token logprob)")
    roll.add_argument("--plan", choices=["pause", "resume"], default=None,
                      help="pause serve.rollout_plan, or resume it (after a guardrail stepped it back)")
    drift = verb("drift", cmd_drift, "served traffic against the training prompts: mix, length, vocabulary, agreement",
                 f"distill-ray drift {EXAMPLE}")
    drift.add_argument("--fail-on-drift", action="store_true", help="exit 1 when the verdict is 'drift'")
    verb("redistill", cmd_step, "the flywheel: distil again from the served traffic (new prompts only, the teacher "
         "answers serve paid for reused), fine-tune the current student, promote it if it beats the current one",
         f"distill-ray redistill {EXAMPLE}   # no-op until the served logs hold enough new prompts")
    run = verb("run", cmd_run, "run pipeline steps in order, skipping those already done",
               f"distill-ray run {EXAMPLE} --steps prompts")
    run.add_argument("--steps", default=None, help="comma-separated steps (default: all available)")

    from distill_ray.submit.cli import add_cluster_verbs

    add_cluster_verbs(sub, verb, check_inputs)  # submit, jobs list|status|logs|stop

    teacher = sub.add_parser("teacher", help="the offline teacher (an OpenAI-compatible server on this machine)")
    teacher_sub = teacher.add_subparsers(dest="teacher_verb", required=True, metavar="ACTION")
    serve = teacher_sub.add_parser(
        "serve", help="serve SmolLM2-135M-Instruct (or --model PATH) over /v1/chat/completions",
        description="Serve a model over the OpenAI chat API: vLLM's own server (continuous batching, prefix "
        "caching, logprobs), or distill-ray's transformers server with --engine transformers.",
        epilog="example:\n  distill-ray teacher serve --port 8100\n"
        "  distill-ray teacher serve --engine transformers --port 8100",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8100)
    serve.add_argument("--model", default="smollm2", help="'smollm2' (the offline wheel) or a model path / s3:// / HF id")
    serve.add_argument("--engine", choices=["vllm", "transformers"], default="vllm",
                       help="vllm (default): vLLM's OpenAI server; transformers: distill-ray's own batched server")
    serve.add_argument("--name", default=None, help="vLLM: the model name requests must send (default: "
                       "SmolLM2-135M-Instruct for smollm2, else the folder's name); the transformers server "
                       "accepts any")
    eager = serve.add_mutually_exclusive_group()
    eager.add_argument("--eager", dest="eager", action="store_true", default=None,
                       help="vLLM: no torch.compile (the default on CPU: starts in about 40 s instead of 110 s)")
    eager.add_argument("--compile", dest="eager", action="store_false",
                       help="vLLM: torch.compile the model (slower start, answers about 20-40%% faster on CPU)")
    serve.add_argument("--max-batch", type=int, default=None,
                       help="requests decoded together (transformers: default 8; vLLM: max_num_seqs, default 64)")
    serve.add_argument("--api-key-env", default=None, help="require this env var's value as the bearer token")
    serve.set_defaults(func=cmd_teacher_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # `ray job stop`, Kubernetes and Ctrl-C all end a step cleanly: what it started is stopped.
        signal.signal(signal.SIGTERM, _terminated)
    if getattr(args, "ray_address", None):
        os.environ["RAY_ADDRESS"] = args.ray_address  # what init_ray (and any Ray job it submits) connects to
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"distill-ray {args.verb}: invalid input ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return exc.exit_code
    except (BadInput, StepFailed) as exc:  # every error a step raises for the user (distill_ray/errors.py)
        print(f"distill-ray {args.verb}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"distill-ray {args.verb}: interrupted", file=sys.stderr)
        return 130


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every `finally` (launched teachers are stopped)


if __name__ == "__main__":
    sys.exit(main())
