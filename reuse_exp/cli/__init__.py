"""`reuse-exp`: the tracked run, lm-eval's CLI with the model registered, the study's commands
and the tools. The only click code of the package.

Bad input ends in one line naming the fix (click's usage errors), never a traceback: the
layers below raise the package's errors (reuse_exp/errors.py) and the commands print them.
"""
from __future__ import annotations

import os
import sys

# Progress bars only on a terminal: lm-eval draws tqdm bars (building requests, checking its
# cache), a line of carriage returns per rank in a log file. tqdm reads TQDM_DISABLE when it
# is imported, so before anything imports it; the run's own bar asks for a terminal itself.
if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")

import click  # noqa: E402

from .run import lm_eval_cli, run  # noqa: E402
from .study import audit_cmd, compare_cmd, grid, runs, ui_cmd  # noqa: E402
from .tools import bench, frontier, pathcheck, tiny, trajectory  # noqa: E402


@click.group()
def main():
    """Layer reuse in Fast-dLLM v2, evaluated with lm-eval and tracked with MLflow."""


for command in (run, lm_eval_cli, grid, compare_cmd, audit_cmd, runs, ui_cmd, frontier, bench, trajectory, pathcheck,
                tiny):
    main.add_command(command)
