"""One Prefect flow per pipeline stage; `t2 <stage>` (and so `dvc repro`) runs them."""
from __future__ import annotations

from prefect import flow

from transformer2.config import Params, load_params
from transformer2.errors import UserError

from . import layout


def _retryable(task, task_run, state) -> bool:
    """Retry an unexpected error, never bad input (`UserError`: the same input fails the same way)."""
    try:
        state.result(raise_on_failure=True)
    except UserError:
        return False
    except Exception:
        return True
    return True


def with_retries(task, params: Params):
    """The stage's task with `execution.retries` (and its delay) from params; a failed attempt's MLflow run
    ends FAILED and the next attempt starts a new one (resumable stages continue from their checkpoint)."""
    ex = params.execution
    if not ex.retries:
        return task
    return task.with_options(retries=ex.retries, retry_delay_seconds=ex.retry_delay_s, retry_condition_fn=_retryable)


PARENT_ENV = "T2_PARENT_FLOW_RUN"  # set by `t2 repro` for its stages: the flow run they are subflows of


def run_stage(stage_flow, **parameters):
    """Call a stage's flow. Under `t2 repro` (PARENT_ENV names its flow run; DVC started this process) the
    stage's flow run is made a subflow of it, as an in-process subflow is: a tracking task run in the repro's
    flow run (its state follows the subflow's, on the server) and this flow run under it. Anywhere else, or
    if the parent cannot be reached, a plain call (a flow run of its own)."""
    import os

    from prefect.context import FlowRunContext

    parent = os.environ.get(PARENT_ENV)
    if not parent or FlowRunContext.get() is not None:
        return stage_flow(**parameters)
    from uuid import UUID, uuid4

    from prefect import Task
    from prefect.client.orchestration import get_client
    from prefect.context import TagsContext
    from prefect.flow_engine import run_flow
    from prefect.states import Pending

    try:
        with get_client(sync_client=True) as client:
            tracker = client.create_task_run(Task(name=stage_flow.name, fn=stage_flow.fn), UUID(parent),
                                             uuid4().hex, name=stage_flow.name, state=Pending())
            run = client.create_flow_run(stage_flow, parameters=stage_flow.serialize_parameters(parameters),
                                         parent_task_run_id=tracker.id, state=Pending(),
                                         tags=TagsContext.get().current_tags)
    except Exception as err:  # noqa: BLE001  (the stage must run either way; it is only the link)
        import sys

        print(f"t2: warning: not linked to the run's flow run {parent} ({type(err).__name__}: {err})", file=sys.stderr)
        return stage_flow(**parameters)
    return run_flow(stage_flow, flow_run=run, parameters=parameters)


@flow(name="model")
def model_flow(params_path: str = str(layout.PARAMS)) -> dict:
    from tasks.model import prepare_model_task

    params = load_params(params_path)
    return with_retries(prepare_model_task, params)(params, str(layout.MODEL_DIR), str(layout.metrics_file("model")))


@flow(name="data")
def data_flow(params_path: str = str(layout.PARAMS)) -> dict:
    from tasks.data import prepare_data_task

    params = load_params(params_path)
    return with_retries(prepare_data_task, params)(params, str(layout.DATA_DIR), str(layout.metrics_file("data")))


@flow(name="decompose")
def decompose_flow(params_path: str = str(layout.PARAMS)) -> dict:
    from tasks.decompose import decompose_task

    params = load_params(params_path)
    return with_retries(decompose_task, params)(params, str(layout.MODEL_DIR), str(layout.SVD_DIR),
                                                str(layout.metrics_file("decompose")))


def expert_args(task: str) -> dict:
    """Where the expert of `task` reads and writes (mirrors dvc.yaml's expert stage)."""
    return dict(task_name=task, model_dir=str(layout.MODEL_DIR), svd_dir=str(layout.SVD_DIR),
                data_dir=str(layout.DATA_DIR), out_dir=str(layout.EXPERTS_DIR / task),
                run_dir=str(layout.CHECKPOINTS_DIR / f"expert_{task}"),
                metrics_path=str(layout.metrics_file(f"expert_{task}")),
                curve_path=str(layout.PLOTS_DIR / f"expert_{task}.csv"))


@flow(name="expert", flow_run_name="expert-{task}")
def expert_flow(task: str, params_path: str = str(layout.PARAMS), resume: bool = False) -> dict:
    from tasks.expert import train_expert_task

    params = load_params(params_path)
    return with_retries(train_expert_task, params)(params, resume=resume, **expert_args(task))


def lora_args(task: str) -> dict:
    """Where the LoRA baseline of `task` reads and writes (mirrors dvc.yaml's lora stage)."""
    return dict(task_name=task, model_dir=str(layout.MODEL_DIR), data_dir=str(layout.DATA_DIR),
                out_dir=str(layout.LORA_DIR / task), run_dir=str(layout.CHECKPOINTS_DIR / f"lora_{task}"),
                metrics_path=str(layout.metrics_file(f"lora_{task}")),
                curve_path=str(layout.PLOTS_DIR / f"lora_{task}.csv"))


@flow(name="lora", flow_run_name="lora-{task}")
def lora_flow(task: str, params_path: str = str(layout.PARAMS), resume: bool = False) -> dict:
    from tasks.lora import train_lora_task

    params = load_params(params_path)
    return with_retries(train_lora_task, params)(params, resume=resume, **lora_args(task))


@flow(name="classifier")
def classifier_flow(params_path: str = str(layout.PARAMS), resume: bool = False) -> dict:
    from tasks.classifier import train_classifier_task

    params = load_params(params_path)
    return with_retries(train_classifier_task, params)(params, str(layout.MODEL_DIR), str(layout.SVD_DIR),
                                 str(layout.DATA_DIR), str(layout.CLASSIFIER_DIR),
                                 str(layout.CHECKPOINTS_DIR / "classifier"), str(layout.metrics_file("classifier")),
                                 str(layout.PLOTS_DIR / "classifier.csv"), str(layout.PLOTS_DIR / "dispatch"),
                                 resume=resume)


@flow(name="cem", flow_run_name="cem-{task}")
def cem_flow(task: str, params_path: str = str(layout.PARAMS), resume: bool = False) -> dict:
    from tasks.cem import cem_task

    params = load_params(params_path)
    return with_retries(cem_task, params)(params, task, str(layout.MODEL_DIR), str(layout.SVD_DIR), str(layout.DATA_DIR),
                    str(layout.EXPERTS_DIR), str(layout.CEM_DIR / task), str(layout.metrics_file(f"cem_{task}")),
                    str(layout.PLOTS_DIR / f"cem_{task}.csv"), run_dir=str(layout.CHECKPOINTS_DIR / f"cem_{task}"),
                    resume=resume)


@flow(name="eval", flow_run_name="eval-{kind}-{task}")
def eval_flow(kind: str, task: str, params_path: str = str(layout.PARAMS)) -> dict:
    import json

    from tasks.eval import evaluate_cell_task, model_args, strategy_model_args
    from transformer2.cells import TWO_PASS_KINDS

    params = load_params(params_path)
    extra: dict = {}
    inputs = {"model": str(layout.MODEL_DIR)}
    if kind in TWO_PASS_KINDS:
        experts = {t: str(layout.EXPERTS_DIR / t) for t in params.rl.tasks}
        args = strategy_model_args(kind, params, str(layout.MODEL_DIR), str(layout.SVD_DIR), experts,
                                   classifier_dir=str(layout.CLASSIFIER_DIR), cem_dir=str(layout.CEM_DIR / task))
        inputs.update({f"expert_{t}": folder for t, folder in experts.items()})
        if kind == "classifier":
            inputs["classifier"] = str(layout.CLASSIFIER_DIR)
        if kind == "few_shot":
            inputs["cem"] = str(layout.CEM_DIR / task)
            search = layout.metrics_file(f"cem_{task}")  # the search's time is a metric, not part of its output
            if search.is_file():
                m = json.loads(search.read_text())
                extra = {"adaptation_search_s": m.get("search_seconds"), "cem_shots": m.get("shots")}
    else:
        adapter = {"svf": layout.EXPERTS_DIR / task, "lora": layout.LORA_DIR / task}.get(kind)
        args = model_args(kind, str(layout.MODEL_DIR), str(layout.SVD_DIR), str(adapter) if adapter else None)
        if adapter is not None:
            inputs[{"svf": "expert", "lora": "adapter"}[kind]] = str(adapter)
    return with_retries(evaluate_cell_task, params)(params, kind, task, args, str(layout.DATA_DIR), str(layout.EVAL_DIR / f"{kind}_{task}"),
                              str(layout.metrics_file(f"eval_{kind}_{task}")), extra,
                              run_dir=str(layout.CHECKPOINTS_DIR / f"eval_{kind}_{task}"), inputs=inputs,
                              base_samples=None if kind == "base" else str(layout.base_samples(task)))


@flow(name="report")
def report_flow(params_path: str = str(layout.PARAMS)) -> dict:
    """The report of exactly the cells the current dvc.yaml and params produce."""
    from tasks.report import report_task

    from .dag import dag_stages, eval_cells, report_units, stale_plots

    stages = dag_stages(params_path)
    params = load_params(params_path)
    return with_retries(report_task, params)(params, str(layout.METRICS_DIR), eval_cells(stages), report_units(stages),
                       str(layout.REPORTS_DIR / "results.md"), str(layout.PLOTS_DIR / "results.png"),
                       str(layout.RESULTS_FILE), stale_plots(params_path))


STAGES = {"model": model_flow, "data": data_flow, "decompose": decompose_flow, "classifier": classifier_flow,
          "report": report_flow}
