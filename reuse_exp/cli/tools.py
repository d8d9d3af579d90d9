"""Tools beside the study: the benchmark, the path check, the bundled tiny model's data and
training, and its frontier. Each parses its options into the typed values the module below takes."""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

import click

from .options import one_line


def write_atomically(path: Path, text: str) -> None:
    """A reader (or a kill mid-write) sees the old file or the new one, never a truncated one."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def comma_list(kind):
    """A comma list (`1,8,32`) as a tuple of `kind`."""
    class CommaList(click.ParamType):
        name = f"{kind.__name__},..."

        def convert(self, value, param, ctx):
            if isinstance(value, tuple):
                return value
            try:
                return tuple(kind(x) for x in str(value).split(",") if x.strip())
            except ValueError:
                self.fail(f"{value!r}: give a comma list of {kind.__name__} values", param, ctx)
    return CommaList()


# -- the benchmark and the path check -----------------------------------------------------------
@click.command(context_settings={"show_default": True})
@click.option("--shape", default="tiny", help="named shape: tiny, 1.5b, 7b")
@click.option("--device", default=None, help="default: cuda when there is one, else cpu")
@click.option("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
@click.option("--prompt-len", type=int, default=256)
@click.option("--new-tokens", type=int, default=256)
@click.option("--batch", type=comma_list(int), default="1,8,32,64")
@click.option("--k", type=comma_list(int), default="1,2,3")
@click.option("--subset", type=comma_list(str), default="first")
@click.option("--mode", type=click.Choice(["output", "delta"]), default="output")
@click.option("--path", type=click.Choice(["eager", "fast"]), default="fast",
              help="fast: static-shape forwards, CUDA graphs on a GPU; eager: plain PyTorch")
@click.option("--extra", type=comma_list(str), default="",
              help="more end-to-end policies: replay:K, adaptive-replay:T, adaptive-delta:T, depth-delta:T")
@click.option("--iters", type=int, default=20, help="timed iterations per forward kind")
@click.option("--repeats", type=int, default=2, help="timed end-to-end decodes per config")
@click.option("--copy-mb", type=int, default=None, help="bytes copied to measure bandwidth")
@click.option("--matmul-n", type=int, default=None, help="size of the matrix product for the peak")
@click.option("--quick", is_flag=True, default=False, help="the preset that fits one 600 s device call on the 7B "
              "shape (batch 1 and 32, k=1,2, adaptive-delta at drift 0 and 1.0, both trajectories, 128 new tokens); "
              "options given beside it win")
@click.option("--warmup-batches", type=comma_list(int), default="1,8,32", help="batch sizes of the fresh "
              "processes' first decodes")
@click.option("--warmup-processes", type=int, default=None, help="fresh processes in a row, the first on an empty "
              "compile cache, the others on the kept one [default: 2 on a GPU, 0 on CPU]")
@click.option("--check-tokens", type=int, default=0, help="also compare the eager and fast paths' first N "
              "tokens at k=1")
@click.option("--trajectory", "--trajectories", "trajectories", type=comma_list(str), default="one-token",
              help="end to end on each: one-token (random weights), a bundled profile (tiny_gsm), a saved "
              "JSON file or run:RUN_ID (a tracked run's unmasking, from the tracking store)")
@click.option("--decode-batches", type=comma_list(int), default=None,
              help="decode end to end at these batch sizes only (forwards are timed at every --batch) [default: all]")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the result as JSON here")
@click.option("--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the markdown table here")
@click.pass_context
def bench(ctx, json_out, markdown, quick, **options):
    """Benchmark random weights of a named shape on fixed trajectories (docs/bench.md)."""
    from ..engine.bench import QUICK, BenchArgs, run_bench
    from ..engine.bench_report import markdown as report
    if quick:   # the preset's values for the options left at their defaults
        given = {k for k in options if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT}
        options |= {k: v for k, v in QUICK.items() if k not in given}
    args = BenchArgs(**options)

    def save(result):   # after every batch row: a benchmark cut short keeps what it measured
        if json_out:
            write_atomically(json_out, json.dumps(dataclasses.asdict(result) | {"complete": False}, indent=2))
    with one_line():
        result = run_bench(args, bench_command(args, json_out, markdown), run_trace, on_row=save)
    text = report(result)
    click.echo(text)
    if markdown:
        markdown.write_text(text)
    if json_out:
        write_atomically(json_out, json.dumps(dataclasses.asdict(result) | {"complete": True}, indent=2))


def bench_command(args, json_out: Path | None, markdown: Path | None) -> str:
    """The command line that repeats this benchmark (the result records it): the options that
    differ from their defaults."""
    from ..engine.bench import BenchArgs
    words = ["reuse-exp", "bench"]
    for field in dataclasses.fields(BenchArgs):
        value, option = getattr(args, field.name), "--" + field.name.replace("_", "-")
        if value == field.default:
            continue
        if isinstance(value, bool):
            words.append(option if value else "--no-" + option[2:])
        else:
            words += [option, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    for option, path in (("--json", json_out), ("--markdown", markdown)):
        if path:
            words += [option, str(path)]
    return shlex.join(words)


def run_trace(run_id: str) -> Path:
    """A tracked run's reuse_trace.json, downloaded from the current tracking store."""
    import tempfile

    from mlflow.exceptions import MlflowException

    from ..errors import ConfigError
    from ..study.store import client, tracking_uri
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as progress
    import os
    os.environ[progress.name] = "false"   # one line on failure, not MLflow's progress bar beside it
    try:
        return Path(client().download_artifacts(run_id, "reuse_trace.json", tempfile.mkdtemp(prefix="trajectory_")))
    except (MlflowException, OSError) as e:
        raise ConfigError(f"run {run_id}: no reuse_trace.json in the store {tracking_uri()} "
                          f"({str(e).splitlines()[0]}); set MLFLOW_TRACKING_URI to the run's store") from None


@click.command()
@click.argument("spec")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="the profile's JSON file (reuse_exp/engine/trajectories/NAME.json ships as --trajectory NAME)")
def trajectory(spec, out):
    """Save the unmasking schedule of a tracked run (run:RUN_ID, from the tracking store) or of a
    reuse_trace.json as a trajectory profile for `reuse-exp bench --trajectory`."""
    from ..engine.trajectory import Trajectory
    with one_line():
        t = Trajectory.load(spec, run_trace)
        if t is None:
            raise click.UsageError(f"{spec} is the threshold rule, not a recorded schedule")
        if spec.startswith("run:"):
            from ..study.store import client
            run = client().get_run(spec[4:]).data
            settings = {k: run.params.get(k) for k in ("task", "limit", "k", "threshold", "max_new_tokens", "batch_size")}
            t = Trajectory.from_schedule(t.samples, out.stem, {
                **dict(t.source), **settings, "commit": run.tags.get("git_commit", "unknown"),
                "command": f"reuse-exp trajectory {spec} -o {out}"})
        t.save(out)
    click.echo(f"wrote {out}: {len(t.samples)} samples, {t.tokens_per_step:.2f} tokens per step")


@click.command()
@click.option("--device", default=None, help="default: cuda when there is one, else cpu")
def pathcheck(device):
    """Check that the fast path decodes the eager path's tokens on the tiny shape (fp32); exit 1 if not."""
    from ..engine.pathcheck import check_paths
    if not check_paths(device, echo=click.echo):
        sys.exit(1)


# -- the bundled tiny model ---------------------------------------------------------------------
@click.group()
def tiny():
    """The bundled tiny model: its task data and its training."""


@tiny.command("data")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="default: the shipped task data, reuse_exp/evaluation/tasks/data")
def tiny_data(out):
    """Write the bundled tasks' data (tiny_gsm, tiny_mc): the same files every time."""
    from ..tiny.data import TASKS_DATA, write_task_data
    write_task_data(out or TASKS_DATA)


def train_options(f):
    """One option per TrainConfig field, with its default."""
    from ..tiny.train import TrainConfig
    for field in reversed(dataclasses.fields(TrainConfig)):
        f = click.option("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default,
                         show_default=True)(f)
    return f


@tiny.command("train")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--log-every", type=int, default=100, show_default=True)
@train_options
def tiny_train(out, device, log_every, **config):
    """Train the bundled tiny Fast-dLLM v2 model and write the files reuse_exp/tiny/model ships."""
    from ..tiny.train import TrainConfig, train_and_save
    train_and_save(TrainConfig(**config), out, device, log_every)


def frontier_options(f):
    from ..settings import spec
    from ..study.frontier import EXPERIMENT, LIMIT
    from .options import SettingType
    f = click.option("--experiment", default=EXPERIMENT, show_default=True, help="MLflow experiment of the runs")(f)
    return click.option("--limit", type=SettingType(spec("limit")), default=str(LIMIT), show_default=True,
                        help="tiny_gsm items per configuration (tiny_mc: every item)")(f)


@click.group()
def frontier():
    """Accuracy against skipped layer compute on the bundled tiny model, from tracked runs:
    `frontier run` runs the declared configurations (study/frontier.py), `frontier report`
    reads them back from the store (table, JSON, plot, README sections)."""


@frontier.command("run")
@frontier_options
@click.option("--force", is_flag=True, help="run every configuration, done at HEAD or not")
@click.option("--rerun-contended", is_flag=True, help="also run again the configurations done at HEAD whose "
              "runs' timing was all contended (their tokens/s measured other work too)")
@click.option("--dry-run", is_flag=True, help="print what would run, run nothing")
@click.option("--jobs-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="folder for the snapshot of HEAD the runs use (default ~/.cache/reuse_exp/submitit)")
def frontier_run(limit, experiment, force, rerun_contended, dry_run, jobs_dir):
    """One tracked run per configuration not yet FINISHED at HEAD (CPU, one thread, in turn)."""
    from ..errors import GridStopped
    from ..study import frontier as fr
    try:
        with one_line():
            failed = fr.run(limit, experiment, force, dry_run, click.echo, rerun_contended=rerun_contended,
                            **({"folder": jobs_dir} if jobs_dir else {}))
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
@click.option("--allow-contended", is_flag=True, help="write rows whose run's timing was contended, their "
              "tokens/s starred with the reason (by default refused)")
def frontier_report(limit, experiment, out, readme, allow_mixed_commits, allow_contended):
    """The frontier from its FINISHED runs: every row names its run and commit."""
    from ..study import frontier_report as report
    with one_line():
        built = report.build(limit, experiment, allow_mixed_commits, allow_contended=allow_contended)
        paths = report.write(built, out, readme)
    click.echo(paths["md"].read_text())
    click.echo(f"wrote {', '.join(str(p) for p in paths.values())}" + (f" and {readme}" if readme else ""))
