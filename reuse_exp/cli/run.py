"""`reuse-exp run` (one tracked configuration, MLproject's entry point) and `reuse-exp lm-eval`
(lm-eval's own CLI with the fast_dllm_v2 model registered).

Options also take underscore spellings (`--max_new_tokens`), because `mlflow run` passes
an -P parameter that MLproject does not declare as `--NAME VALUE`.
"""
from __future__ import annotations

import sys

import click
from click.core import ParameterSource

from ..errors import RunFailed, SettingError
from ..knobs import LAUNCHED, MLFLOW_PID
from ..settings import RunSettings
from .options import setting_options


def refuse(line: str) -> None:
    """A value refused on the command line: under `mlflow run`, the run it opened says so."""
    from ..tracking.lifecycle import refuse_outside_run
    refuse_outside_run(line)


def usage_error(line: str) -> None:
    """A refused value: the run `mlflow run` opened says so, and so does one line. Under `mlflow run`
    click's usage lines name a command the user never typed (the -P values were theirs): one line."""
    refuse(line)
    if MLFLOW_PID.read():
        click.echo(f"reuse-exp: {line}", err=True)
        sys.exit(2)
    raise click.UsageError(line)


class RunCommand(click.Command):
    """`run`, whose usage errors (a bad -P value) also end the run `mlflow run` opened, refused."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            usage_error(e.format_message())


@click.command(cls=RunCommand)
@setting_options
def run(**values):
    """Evaluate one configuration and log it to MLflow (the MLproject's entry point)."""
    from ..runner.run import run as tracked_run
    values["include_path"] = tuple(p for group in values["include_path"] for p in group)
    try:
        settings = RunSettings(**values)
    except SettingError as e:
        usage_error(str(e))
    ctx = click.get_current_context()   # what the user gave: a resume takes the rest from the run it resumes
    given = frozenset(n for n in values if ctx.get_parameter_source(n) is not ParameterSource.DEFAULT)
    try:
        summary = tracked_run(settings, given)
    except RunFailed as e:
        if not LAUNCHED.read():   # a rank our launcher started: the launcher says it, once
            click.echo(f"reuse-exp: {e.line}", err=True)
        sys.exit(e.code)
    if summary is not None:   # None: a launched rank, whose launching process prints the summary
        click.echo(summary.text())


@click.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                            "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_cli(args):
    """lm-eval's own CLI with the `fast_dllm_v2` model registered: reuse-exp lm-eval run --model fast_dllm_v2 ..."""
    from lm_eval.__main__ import cli_evaluate

    from ..evaluation import lm  # noqa: F401  registers fast_dllm_v2
    args = list(args)
    if args[:1] == ["run"] and "--device" not in args:
        args += ["--device", "auto"]  # lm-eval's default is cuda:0, even without a GPU
    sys.argv = ["lm-eval", *args]
    cli_evaluate()
