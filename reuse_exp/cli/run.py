"""`reuse-exp run` (one tracked configuration, MLproject's entry point) and `reuse-exp lm-eval`
(lm-eval's own CLI with the fast_dllm_v2 model registered).

Options also take underscore spellings (`--max_new_tokens`), because `mlflow run` passes
an -P parameter that MLproject does not declare as `--NAME VALUE`.
"""
from __future__ import annotations

import sys

import click

from ..errors import RunFailed, SettingError
from ..settings import RunSettings
from .options import setting_options


def refuse(line: str) -> None:
    """A value refused on the command line: under `mlflow run`, the run it opened says so."""
    from ..tracking.lifecycle import refuse_outside_run
    refuse_outside_run(line)


class RunCommand(click.Command):
    """`run`, whose usage errors (a bad -P value) also end the run `mlflow run` opened, refused."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            refuse(e.format_message())
            raise


@click.command(cls=RunCommand)
@setting_options
def run(**values):
    """Evaluate one configuration and log it to MLflow (the MLproject's entry point)."""
    from ..runner.run import run as tracked_run
    values["include_path"] = tuple(p for group in values["include_path"] for p in group)
    try:
        settings = RunSettings(**values)
    except SettingError as e:
        refuse(str(e))
        raise click.UsageError(str(e)) from None
    try:
        summary = tracked_run(settings)
    except RunFailed as e:
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
