"""The `distill-ray` command: a thin face over the library.

Exit codes: 0 done; 1 the step ran and failed; 2 bad input (config, data, arguments), with a
message naming the key, file and line, and no traceback.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections.abc import Callable

from distill_ray import __version__
from distill_ray.config import ConfigError, PipelineConfig, Problem, load_config, resolved_yaml
from distill_ray.filters.verifiers import FilterError
from distill_ray.prompts.read import SourceError
from distill_ray.teacher.errors import BudgetReached, MissingInput, TeacherRejected

EXAMPLE = "jobs/configs/support_orders.yaml"


def check_inputs(config: PipelineConfig) -> list[Problem]:
    """Problems with what the config points at (checked by validate and before every step)."""
    from distill_ray.prompts.read import check_source

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
    _steps()[args.verb](_load(args))
    return 0


def cmd_teacher_serve(args: argparse.Namespace) -> int:
    from distill_ray.teacher.offline import serve

    serve(host=args.host, port=args.port, model_spec=args.model, max_batch=args.max_batch,
          api_key_env=args.api_key_env)
    return 0


def _steps() -> dict[str, Callable[[PipelineConfig], object]]:
    from distill_ray.steps import STEPS  # the one list of steps, shared with `submit` and jobs/

    return {name: step.load() for name, step in STEPS.items()}


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    steps = _steps()
    wanted = [s.strip() for s in args.steps.split(",")] if args.steps else list(steps)
    unknown = [s for s in wanted if s not in steps]
    if unknown:
        raise ConfigError([Problem(key="--steps", message=f"unknown step(s) {', '.join(unknown)}; available: {', '.join(steps)}")])
    problems = check_inputs(config)
    if problems:
        raise ConfigError(problems)
    print(f"distill-ray run {config.name}: steps {', '.join(wanted)}; workdir {config.workdir}")
    start = time.perf_counter()
    for name in wanted:
        t = time.perf_counter()
        print(f"== {name}")
        steps[name](config)
        print(f"== {name} done in {time.perf_counter() - t:.1f}s")
    print(f"distill-ray run: all steps done in {time.perf_counter() - start:.1f}s")
    return 0


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

    def verb(name: str, func: Callable[[argparse.Namespace], int], help_text: str, example: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", help="pipeline config (YAML), e.g. " + EXAMPLE)
        p.add_argument("-o", "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                       help="override a config key (repeatable), e.g. -o prompts.size=500")
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
    run = verb("run", cmd_run, "run pipeline steps in order, skipping those already done",
               f"distill-ray run {EXAMPLE} --steps prompts")
    run.add_argument("--steps", default=None, help="comma-separated steps (default: all available)")

    from distill_ray.jobs.cli import add_cluster_verbs

    add_cluster_verbs(sub, verb)  # submit, jobs list|status|logs|stop

    teacher = sub.add_parser("teacher", help="the offline teacher (an OpenAI-compatible server on this machine)")
    teacher_sub = teacher.add_subparsers(dest="teacher_verb", required=True, metavar="ACTION")
    serve = teacher_sub.add_parser(
        "serve", help="serve SmolLM2-135M-Instruct (or --model PATH) over /v1/chat/completions",
        epilog="example:\n  distill-ray teacher serve --port 8100", formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8100)
    serve.add_argument("--model", default="smollm2", help="'smollm2' (the offline wheel) or a model path / s3:// / HF id")
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    serve.add_argument("--api-key-env", default=None, help="require this env var's value as the bearer token")
    serve.set_defaults(func=cmd_teacher_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"distill-ray {args.verb}: invalid input ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except (SourceError, MissingInput, TeacherRejected, FilterError) as exc:
        print(f"distill-ray {args.verb}: {exc}", file=sys.stderr)
        return 2
    except BudgetReached as exc:
        print(f"distill-ray {args.verb}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"distill-ray {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
