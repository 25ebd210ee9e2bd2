"""`t2`: the one command line. `t2 <stage>` runs that stage's Prefect flow (dvc.yaml calls these).

Heavy imports happen after the arguments and params.yaml are checked, so a typo is reported
in a second, not after Prefect has started a server.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from transformer2.cells import CELL_KINDS

QUIET_ENV = {  # no telemetry, no phoning home; offline switches stay the user's choice
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "INFO",
}

STAGE_HELP = {
    "model": "resolve model.name, convert built-ins/GGUF once, record the base fingerprint",
    "data": "write the train/validation/test splits of every task in data.tasks",
    "decompose": "thin SVD of every svf.targets matrix (resumable)",
    "report": "Table-1/Table-2-style results (reports/results.md, plots/results.png) from every eval cell",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2", description="Transformer² pipeline: SVF experts, two-pass "
                                "adaptation, LoRA baselines, lm-eval benchmarks.")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    for name, text in STAGE_HELP.items():
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--params", default="params.yaml", help="config file (default: params.yaml)")
    for name, text, task_help in (
            ("train-expert", "train one SVF expert with REINFORCE (stage `expert`)", "training task, e.g. gsm8k"),
            ("train-lora", "train one LoRA baseline with PEFT (stage `lora`)", "training task, e.g. gsm8k"),
            ("classifier", "train the classification expert z_c and measure dispatch accuracy (stage "
                           "`classifier`)", None),
            ("cem", "few-shot CEM: the expert mix for one unseen task (stage `cem`)",
             "a task in cem.tasks, e.g. math, humaneval, arc_challenge")):
        s = sub.add_parser(name, help=text, description=text)
        if task_help:
            s.add_argument("--task", required=True, help=task_help)
        s.add_argument("--params", default="params.yaml")
        s.add_argument("--resume", action="store_true",
                       help="continue from the run's checkpoint if one of the same config exists")
    s = sub.add_parser("eval", help="one cell of the evaluation matrix through lm-eval (stages eval-*)")
    s.add_argument("--kind", required=True, choices=CELL_KINDS,
                   help="base model; base + the task's SVF expert / LoRA adapter; or a two-pass strategy over "
                        "the SVF experts: prompt dispatch, classifier expert, few-shot CEM mix")
    s.add_argument("--task", required=True)
    s.add_argument("--params", default="params.yaml")
    s = sub.add_parser("pipeline", help="run every stage in DAG order (through `dvc repro` by default)")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--no-dvc", action="store_true", help="run the stage flows in-process, without DVC")
    s.add_argument("--parallel", action="store_true", help="with --no-dvc: train the experts concurrently")
    s = sub.add_parser("serve", help="serve the pipeline flow for the Prefect UI (runs until stopped)")
    s.add_argument("--params", default="params.yaml")
    when = s.add_mutually_exclusive_group()
    when.add_argument("--cron", default=None, help='schedule, e.g. "0 3 * * *" (a 6th field is seconds); '
                      "none: run from the UI only")
    when.add_argument("--interval", type=float, default=None, help="seconds between scheduled runs")
    s.add_argument("--name", default="transformer2-pipeline")
    sub.add_parser("lm-eval", help="lm-evaluation-harness's CLI with the `transformer2` model registered "
                   "(all lm-eval options; e.g. --model transformer2 --model_args pretrained=artifacts/model,"
                   "svd=artifacts/svd,expert=artifacts/experts/gsm8k --tasks gsm8k)", add_help=False)
    s = sub.add_parser("check-params", help="validate params.yaml and print the resolved config")
    s.add_argument("--params", default="params.yaml")
    return p


def _fail(message: str) -> int:
    print(f"t2: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
    if argv[:1] == ["lm-eval"]:  # lm-eval's own CLI, with the `transformer2` model registered
        from transformer2.errors import UserError
        from transformer2.harness import cli_main

        try:
            return cli_main(argv[1:])
        except UserError as err:
            return _fail(str(err))
    args = _parser().parse_args(argv)

    from transformer2.errors import UserError

    try:
        from transformer2.config import load_params

        params = load_params(args.params)  # fail fast, before any server starts
        if args.command == "check-params":
            import yaml

            print(yaml.safe_dump(params.model_dump(), sort_keys=False), end="")
            return 0
        if args.command == "pipeline":
            from .pipeline import pipeline_flow

            pipeline_flow(params_path=args.params, use_dvc=not args.no_dvc, parallel=args.parallel)
        elif args.command == "serve":
            from prefect.settings import get_current_settings

            if not get_current_settings().api.url:
                return _fail("`t2 serve` needs a Prefect server (a temporary one schedules nothing): run "
                             "`prefect server start --host 127.0.0.1` and "
                             "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
            from .pipeline import pipeline_flow

            pipeline_flow.serve(name=args.name, cron=args.cron, interval=args.interval, limit=1,
                                parameters={"params_path": args.params})
        elif args.command == "train-expert":
            from .stages import expert_flow

            if args.task not in params.rl.tasks:
                return _fail(f"--task {args.task!r} is not in rl.tasks {params.rl.tasks}")
            expert_flow(task=args.task, params_path=args.params, resume=args.resume)
        elif args.command == "train-lora":
            from .stages import lora_flow

            if args.task not in params.lora.tasks:
                return _fail(f"--task {args.task!r} is not in lora.tasks {params.lora.tasks}")
            lora_flow(task=args.task, params_path=args.params, resume=args.resume)
        elif args.command == "classifier":
            from .stages import classifier_flow

            classifier_flow(params_path=args.params, resume=args.resume)
        elif args.command == "cem":
            from .stages import cem_flow

            if args.task not in params.cem.tasks:
                return _fail(f"--task {args.task!r} is not in cem.tasks {params.cem.tasks}")
            cem_flow(task=args.task, params_path=args.params, resume=args.resume)
        elif args.command == "eval":
            from .stages import eval_flow

            from transformer2.tasks import benchmark_names

            if args.task not in benchmark_names():
                return _fail(f"unknown --task {args.task!r}; known: {', '.join(benchmark_names())}")
            eval_flow(kind=args.kind, task=args.task, params_path=args.params)
        else:
            from .stages import STAGES

            STAGES[args.command](params_path=args.params)
    except UserError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume")
    return 0


if __name__ == "__main__":
    sys.exit(main())
