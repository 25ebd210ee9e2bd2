"""`t2`: the one command line. `t2 <stage>` runs that stage's Prefect flow (dvc.yaml calls these).

Heavy imports happen after the arguments, params.yaml, the stage's inputs and the tracking server
are checked, so a typo or a missing expert is one `t2: error:` line in a second, not a traceback
after Prefect has started a server. Errors are one line; `--debug` (or T2_DEBUG=1) shows Prefect's
tracebacks and raises, and the last unexpected error's traceback is kept in $PREFECT_HOME/t2-error.log.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
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
    "report": "Table-1/Table-2-style results (reports/results.md, plots/results.png) from the eval cells "
              "of the current dvc.yaml and params",
}
TRACKED = {"model", "data", "decompose", "report", "train-expert", "train-lora", "classifier", "cem", "eval",
           "pipeline", "serve", "repro"}  # commands that log to MLflow
FORKED = TRACKED - {"pipeline", "serve", "repro"}  # the stages: run in a child of the forkserver
# a stage command's flow in flows.stages and what it takes from argv besides --params (the others: stages.STAGES)
STAGE_FLOWS = {"train-expert": ("expert_flow", ("task", "resume")), "train-lora": ("lora_flow", ("task", "resume")),
               "classifier": ("classifier_flow", ("resume",)), "cem": ("cem_flow", ("task", "resume")),
               "eval": ("eval_flow", ("kind", "task"))}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2", description="Transformer² pipeline: SVF experts, two-pass "
                                "adaptation, LoRA baselines, lm-eval benchmarks.")
    p.add_argument("--debug", action="store_true", default=os.environ.get("T2_DEBUG") == "1",
                   help="show tracebacks (also T2_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True, metavar="command")
    s = sub.add_parser("params", help="write what each stage reads to stage_params/ (stage `params`; DVC reruns "
                       "a stage when its file changes)")
    s.add_argument("--params", default="params.yaml")
    s.add_argument("--dry", action="store_true", help="only list the stage units whose settings would change")
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
    s.add_argument("--parallel", action="store_true", help="with --no-dvc: train the experts concurrently "
                   "(execution.task_runner: threads of this process, or a local Dask cluster)")
    s = sub.add_parser("repro", help="`dvc repro` as one Prefect flow run (any dvc repro arguments, e.g. "
                       "`t2 repro expert@gsm8k`, `t2 repro -f`)",
                       description="Runs `dvc repro ARGS` on the project's shared Prefect server (or the one "
                       "PREFECT_API_URL points at) as one flow run: every stage's flow run is a subflow of it, "
                       "tagged t2-pipeline:<id>, and its MLflow run nests under one parent. The shared server stops "
                       "itself T2_PREFECT_SERVER_IDLE_S (120) seconds after its last stage.")
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
    s = sub.add_parser("plots", help="`dvc plots show` of this run's DAG only, as params.yaml resolves it: what its "
                       "stages write, no other profile's curves, no warning for tasks it does not run (other "
                       "arguments go to dvc plots show, e.g. --open)")
    s = sub.add_parser("check-params", help="validate params.yaml and print the resolved config")
    s.add_argument("--params", default="params.yaml")
    return p


def _fail(message: str, code: int = 2) -> int:
    """One line, always: a message of several lines (every invalid key of a config) is joined with '; '."""
    first, *rest = message.strip().splitlines() or [""]
    if rest:
        first = first.rstrip(":") + ": " + "; ".join(line.strip() for line in rest if line.strip())
    print(f"t2: error: {first}", file=sys.stderr)
    return code


class _NoRunErrors(logging.Filter):
    """Prefect logs a failed task's and flow's exception (with its traceback) before it reaches `main`,
    which prints it as one line: keep those records off the console (the Prefect UI still has them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return True
        return record.levelno < logging.ERROR and not record.getMessage().startswith(
            ("Finished in state Failed", "Finished in state Crashed"))


def _quiet_prefect_errors() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _NoRunErrors) for f in handler.filters):
            handler.addFilter(_NoRunErrors())


def _unexpected(err: BaseException) -> int:
    log = Path(os.environ["PREFECT_HOME"]) / "t2-error.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(err)))
        where = f"traceback in {log}"
    except OSError:
        where = "rerun with --debug for the traceback"
    lines = str(err).strip().splitlines() or [""]
    return _fail(f"{type(err).__name__}: {lines[0]}{' …' if len(lines) > 1 else ''} ({where})", 1)


def _plots(args: argparse.Namespace) -> int:
    """`t2 plots`: `dvc plots show` with the current DAG's plots as targets (flows/dag.py: plot_targets)."""
    import subprocess

    from transformer2.errors import UserError

    from .dag import plot_targets

    targets, left_out = plot_targets(args.params)
    if not targets:
        raise UserError("no plot of this DAG is written yet: run `dvc repro` first")
    for reason in dict.fromkeys(left_out.values()):
        names = ", ".join(name for name, why in left_out.items() if why == reason)
        print(f"t2 plots: not drawn, {reason}: {names}", file=sys.stderr)
    return subprocess.run([sys.executable, "-m", "dvc", "plots", "show", *args.dvc_args, *targets]).returncode


def _check_before_start(args: argparse.Namespace, params) -> None:
    """Everything that can fail without a model or Prefect: the task, the stage's inputs, the tracking server."""
    from transformer2.errors import UserError

    from .inputs import check_inputs

    if getattr(args, "dask", False):  # before anything heavy: one line naming the key and the install command
        from .dask_runner import require_prefect_dask

        require_prefect_dask()
    lists = {"train-expert": "rl", "train-lora": "lora", "cem": "cem"}
    if args.command in lists:
        tasks = getattr(params, lists[args.command]).tasks
        if args.task not in tasks:
            raise UserError(f"--task {args.task!r} is not in {lists[args.command]}.tasks {tasks}")
    if args.command == "eval":
        from transformer2.tasks import benchmark_names

        if args.task not in benchmark_names():
            raise UserError(f"unknown --task {args.task!r}; known: {', '.join(benchmark_names())}")
    if args.command in TRACKED:  # bounded (3 s), and the stage would fail on it after its work
        from tasks.tracking import check_tracking_uri

        check_tracking_uri(params.tracking.uri)
    check_inputs(args.command, params, getattr(args, "task", None), getattr(args, "kind", None))


def main(argv: list[str] | None = None) -> int:
    """`t2 ARGV`. As the process's entry point (argv None), a stage runs in a child of the project's
    forkserver (flows/forkserver.py); called with an argv (`t2 pipeline --no-dvc`, tests), in this process."""
    forkable, argv = argv is None, sys.argv[1:] if argv is None else argv
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
    if not sys.stderr.isatty():  # progress bars only on a terminal (tqdm, datasets, the hub)
        for key in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(key, "1")
    if argv[:1] == ["lm-eval"]:  # lm-eval's own CLI, with the `transformer2` model registered
        from transformer2.errors import UserError
        from transformer2.harness import cli_main

        try:
            return cli_main(argv[1:])
        except UserError as err:
            return _fail(str(err))
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("repro", "plots"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.dvc_args, args.params = extra, getattr(args, "params", "params.yaml")
    args.argv, args.forkable = argv, forkable

    from transformer2.errors import UserError

    try:
        from transformer2.config import load_params

        params = load_params(args.params)  # fail fast, before any server starts
        if args.command == "check-params":
            import yaml

            print(yaml.safe_dump(params.model_dump(), sort_keys=False), end="")
            return 0
        if args.command == "params":
            from . import layout
            from .dag import write_stage_params

            changed = write_stage_params(args.params, dry=args.dry)
            verb = "would change" if args.dry else "changed"
            print(f"{layout.STAGE_PARAMS_DIR}/: {len(changed)} {verb}" + (f": {', '.join(changed)}" if changed else ""))
            return 0
        if args.command == "plots":
            return _plots(args)
        args.dask = args.command == "pipeline" and args.no_dvc and args.parallel and \
            params.execution.task_runner == "dask"  # the parallel stages on a local Dask cluster
        _check_before_start(args, params)
        with contextlib.ExitStack() as stack:
            return _run(args, stack)
    except UserError as err:
        if args.debug:
            raise
        return _fail(str(err))
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to resume")
    except OSError as err:
        if args.debug:
            raise
        if err.filename is None:
            return _unexpected(err)
        return _fail(f"cannot write or read {err.filename}: {err.strerror}; make it writable (or free disk space) "
                     "and rerun (writes are atomic: earlier outputs are intact)")
    except Exception as err:  # a bug or an environment problem: one line here, the traceback in a file
        if args.debug:
            raise
        return _unexpected(err)


def _run(args: argparse.Namespace, stack: contextlib.ExitStack) -> int:
    """The command's flow. Before Prefect is imported here, a pipeline run (`repro`, `pipeline` through DVC)
    exports its Prefect server to its stages, and any other command without PREFECT_API_URL points at the
    project's shared server (or, T2_PREFECT_SERVER=temporary, gets a temporary one that dies with it). Flow
    runs of a pipeline's stages carry its tag. A stage as the process's entry point then runs in a child of
    the forkserver (its Prefect settings are read when the forkserver imports Prefect: the server comes first)."""
    from . import forkserver
    from .server import guard_temporary_server, pipeline_server, pipeline_tag, use_project_server

    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    fork = args.forkable and args.command in FORKED and forkserver.usable()
    if args.command == "repro" or (args.command == "pipeline" and (not args.no_dvc or getattr(args, "dask", False))):
        stack.enter_context(pipeline_server(log=log))
    elif args.command != "serve":
        use_project_server(log=log)  # the project's shared server, unless T2_PREFECT_SERVER=temporary
    if fork and (code := forkserver.run_forked(args.argv, log=log)) is not None:
        return code
    from transformer2.runtime import keep_freed_memory

    keep_freed_memory()  # this process runs the stage: fewer page faults in its forwards
    if not args.debug:
        import prefect.main  # noqa: F401  (configures logging; the filter goes on its console handler)

        _quiet_prefect_errors()
    if args.command != "serve":
        guard_temporary_server()  # T2_PREFECT_SERVER=temporary: Prefect's own, dying with this process
    if pipeline_tag():
        from prefect import tags

        stack.enter_context(tags(pipeline_tag()))
    if args.command == "repro":
        from .pipeline import run_repro

        run_repro(dvc_args=args.dvc_args, params_path=args.params)
    elif args.command == "pipeline":
        from .pipeline import run_pipeline

        run_pipeline(params_path=args.params, use_dvc=not args.no_dvc, parallel=args.parallel)
    elif args.command == "serve":
        from prefect.settings import get_current_settings

        if not get_current_settings().api.url:
            return _fail("`t2 serve` needs a Prefect server (a temporary one schedules nothing): run "
                         "`prefect server start --host 127.0.0.1` and "
                         "`export PREFECT_API_URL=http://127.0.0.1:4200/api`")
        from .pipeline import pipeline_flow

        pipeline_flow.serve(name=args.name, cron=args.cron, interval=args.interval, limit=1,
                            parameters={"params_path": args.params})
    else:
        from . import stages

        name, names = STAGE_FLOWS.get(args.command, (None, ()))
        flow = getattr(stages, name) if name else stages.STAGES[args.command]
        stages.run_stage(flow, params_path=args.params, **{n: getattr(args, n) for n in names})
    return 0


if __name__ == "__main__":
    sys.exit(main())
