"""Preloaded by every worker of the pipeline's local Dask cluster (`flows.dask_runner`): sets the worker's
torch threads to its share of the cores and imports the stages' heavy modules in the background, so the
worker is up at once and its first stage unit finds them loaded (the first stages meanwhile run in `t2`)."""
from __future__ import annotations

import os
import threading
from typing import Optional

_warming: Optional[threading.Thread] = None


def _warm_up() -> None:
    import torch

    threads = os.environ.get("T2_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    import mlflow  # noqa: F401
    import transformers  # noqa: F401

    from . import cli, pipeline, stages  # noqa: F401


def dask_setup(worker=None) -> None:
    global _warming
    _warming = threading.Thread(target=_warm_up, name="t2-warm-up", daemon=True)
    _warming.start()


def ready() -> None:
    """Wait for the warm-up (a stage unit never imports alongside it) and pin torch's threads again."""
    if _warming is not None:
        _warming.join()
    threads = os.environ.get("T2_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
