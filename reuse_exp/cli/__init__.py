"""`reuse-exp`: the tracked run, lm-eval's CLI with the model registered, the study's commands
and the tools. The only click code of the package.

Bad input ends in one line naming the fix (click's usage errors), never a traceback: the
layers below raise the package's errors (reuse_exp/errors.py) and the commands print them.
"""
from __future__ import annotations

import click

from .run import lm_eval_cli, run
from .study import audit_cmd, compare_cmd, grid, runs
from .tools import bench, frontier, pathcheck, tiny


@click.group()
def main():
    """Layer reuse in Fast-dLLM v2, evaluated with lm-eval and tracked with MLflow."""


for command in (run, lm_eval_cli, grid, compare_cmd, audit_cmd, runs, frontier, bench, pathcheck, tiny):
    main.add_command(command)
