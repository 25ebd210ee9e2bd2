"""One Prefect flow per pipeline stage; `t2 <stage>` (and so `dvc repro`) runs them."""
from __future__ import annotations

from prefect import flow

from transformer2.config import load_params

from . import layout


@flow(name="model")
def model_flow(params_path: str = str(layout.PARAMS)) -> dict:
    from tasks.model import prepare_model_task

    return prepare_model_task(load_params(params_path), str(layout.MODEL_DIR), str(layout.metrics_file("model")))


@flow(name="data")
def data_flow(params_path: str = str(layout.PARAMS)) -> dict:
    from tasks.data import prepare_data_task

    return prepare_data_task(load_params(params_path), str(layout.DATA_DIR), str(layout.metrics_file("data")))


@flow(name="decompose")
def decompose_flow(params_path: str = str(layout.PARAMS)) -> dict:
    from tasks.decompose import decompose_task

    return decompose_task(load_params(params_path), str(layout.MODEL_DIR), str(layout.SVD_DIR),
                          str(layout.metrics_file("decompose")))


@flow(name="expert", flow_run_name="expert-{task}")
def expert_flow(task: str, params_path: str = str(layout.PARAMS), resume: bool = False) -> dict:
    from tasks.expert import train_expert_task

    params = load_params(params_path)
    return train_expert_task(params, task, str(layout.MODEL_DIR), str(layout.SVD_DIR), str(layout.DATA_DIR),
                             str(layout.EXPERTS_DIR / task), str(layout.CHECKPOINTS_DIR / f"expert_{task}"),
                             str(layout.metrics_file(f"expert_{task}")), str(layout.PLOTS_DIR / f"expert_{task}.csv"),
                             resume=resume)


STAGES = {"model": model_flow, "data": data_flow, "decompose": decompose_flow}
