"""`reuse-exp`: the tracked run, lm-eval's CLI with the model registered, and the study's commands.

Bad input ends in one line naming the fix (click's usage errors), never a traceback.
Options also take underscore spellings (`--max_new_tokens`), because `mlflow run` passes
an -P parameter that MLproject does not declare as `--NAME VALUE`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .settings import SPECS, RunSettings, SettingError, Spec
from .study.audit import audit_cmd
from .study.compare import compare_cmd
from .study.grid import grid
from .study.runs import runs


class SettingType(click.ParamType):
    """Parses a value the way the setting's declaration says; its error is the usage error."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.name = spec.kind

    def convert(self, value, param, ctx):
        try:
            return self.spec.parse(value)
        except SettingError as e:
            self.fail(str(e), param, ctx)


def setting_option(spec: Spec):
    names = [spec.option]
    if "-" in spec.option[2:]:
        names.append("--" + spec.name)
    kw = dict(type=SettingType(spec), help=spec.help.replace("`", ""), show_default=spec.text())
    if spec.kind == "paths":
        return click.option(*names, multiple=True, **kw)
    if spec.kind == "bool":  # `--allow-dirty` alone, or `--allow-dirty true`
        return click.option(*names, is_flag=False, flag_value="true", default=spec.text(), **kw)
    return click.option(*names, default=spec.text(), **kw)


def setting_options(f):
    for spec in reversed(SPECS):
        f = setting_option(spec)(f)
    return f


@click.group()
def main():
    """Layer reuse in Fast-dLLM v2, evaluated with lm-eval and tracked with MLflow."""


def refuse(line: str) -> None:
    """A value refused on the command line: under `mlflow run`, the run it opened says so."""
    from .tracking.run import refuse_outside_run
    refuse_outside_run(line)


class RunCommand(click.Command):
    """`run`, whose usage errors (a bad -P value) also end the run `mlflow run` opened, refused."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            refuse(e.format_message())
            raise


@main.command(cls=RunCommand)
@setting_options
def run(**values):
    """Evaluate one configuration and log it to MLflow (the MLproject's entry point)."""
    from .tracking.run import RunFailed, run as tracked_run
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


@main.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                           "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_cli(args):
    """lm-eval's own CLI with the `fast_dllm_v2` model registered: reuse-exp lm-eval run --model fast_dllm_v2 ..."""
    from lm_eval.__main__ import cli_evaluate

    from .evaluation import lm  # noqa: F401  registers fast_dllm_v2
    args = list(args)
    if args[:1] == ["run"] and "--device" not in args:
        args += ["--device", "auto"]  # lm-eval's default is cuda:0, even without a GPU
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


# -- the tiny model's frontier: tracked runs, then a report read from the store ------------------
def _limit(value):
    from .settings import SettingError, spec
    try:
        return spec("limit").parse(value)
    except SettingError as e:
        raise click.BadParameter(str(e)) from None


def frontier_options(f):
    from .study.frontier import EXPERIMENT, LIMIT
    f = click.option("--experiment", default=EXPERIMENT, show_default=True, help="MLflow experiment of the runs")(f)
    return click.option("--limit", default=str(LIMIT), show_default=True, callback=lambda c, p, v: _limit(v),
                        help="tiny_gsm items per configuration (tiny_mc: every item)")(f)


@main.group()
def frontier():
    """Accuracy against skipped layer compute on the bundled tiny model, from tracked runs:
    `frontier run` runs the declared configurations (study/frontier.py), `frontier report`
    reads them back from the store (table, JSON, plot, README sections)."""


@frontier.command("run")
@frontier_options
@click.option("--force", is_flag=True, help="run every configuration, done at HEAD or not")
@click.option("--dry-run", is_flag=True, help="print what would run, run nothing")
@click.option("--jobs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for the snapshot of HEAD the runs use (default ~/.cache/reuse_exp/submitit)")
def frontier_run(limit, experiment, force, dry_run, jobs_dir):
    """One tracked run per configuration not yet FINISHED at HEAD (CPU, one thread, in turn)."""
    from .engine.config import ConfigError
    from .study import frontier as fr
    from .study.launch import GridStopped
    try:
        failed = fr.run(limit, experiment, force, dry_run, click.echo, **({"folder": jobs_dir} if jobs_dir else {}))
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    except GridStopped as e:
        click.echo(f"reuse-exp: {e}", err=True)
        sys.exit(e.code)
    if failed:
        raise click.ClickException(f"{len(failed)} configuration(s) failed: {', '.join(failed)}")


@frontier.command("report")
@frontier_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("frontier_out"),
              show_default=True, help="where frontier.md, .json and .png go")
@click.option("--readme", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the README's frontier and tiny_table sections")
@click.option("--allow-mixed-commits", is_flag=True, help="write the report from runs of several commits, "
              "flagged (by default refused)")
def frontier_report(limit, experiment, out, readme, allow_mixed_commits):
    """The frontier from its FINISHED runs: every row names its run and commit."""
    from .engine.config import ConfigError
    from .study import frontier_report as report
    try:
        built = report.build(limit, experiment, allow_mixed_commits)
        paths = report.write(built, out, readme)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    click.echo(paths["md"].read_text())
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}" + (f" and {readme}" if readme else ""))


main.add_command(grid)
main.add_command(compare_cmd)
main.add_command(audit_cmd)
main.add_command(runs)

if __name__ == "__main__":
    main()
