"""`t2 lm-eval`: lm-eval's own command line with the `transformer2` model and the project's tasks."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError
from . import model as _model  # noqa: F401  (registers the lm-eval model "transformer2")
from .task_configs import task_config_dir


def cli_main(argv: Sequence[str], data_root: Optional[Path] = None) -> int:
    """lm-eval's own CLI (`lm-eval run/ls/validate ...`) with the `transformer2` model registered.

    Unless `--include_path` is given, the project's task configs are generated for `data_root`
    (default: the mirror named by T2_DATA_DIR, else the hub) and passed as `--include_path`,
    so the built-in task names read local data and the `t2_*` tasks exist. Returns the exit
    status.
    """
    from lm_eval.__main__ import cli_evaluate

    from ..tasks import data_dir

    argv = list(argv)
    asks_help = not argv or any(a in ("-h", "--help") for a in argv)
    old_argv = sys.argv
    with tempfile.TemporaryDirectory(prefix="t2-lm-eval-tasks-") as tmp:
        if not asks_help and not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
            try:
                root = Path(data_root) if data_root is not None else data_dir()
            except UserError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            argv += ["--include_path", str(task_config_dir(root, Path(tmp)))]
        sys.argv = ["lm-eval", *argv]
        try:
            cli_evaluate()
        except SystemExit as exit_:
            code = exit_.code
            if code is None or isinstance(code, int):
                return code or 0
            print(code, file=sys.stderr)
            return 1
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        finally:
            sys.argv = old_argv
    return 0
