"""Tools beside the study: the frontier of the bundled tiny model."""
from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--limit", type=click.IntRange(min=2), default=200, show_default=True, help="tiny_gsm items")
@click.option("--delta", default="0.5,0.75,1,1.25", show_default=True, help="adaptive delta-mode drift thresholds")
@click.option("--replay", default="0.5,0.75,1,1.1", show_default=True, help="adaptive replay drift thresholds")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("frontier_out"),
              show_default=True, help="where frontier.md, .json and .png go")
@click.option("--readme", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the README's frontier and tiny_table sections")
@click.option("--experiment", default=None, help="MLflow experiment of the report run (default: Default)")
@click.option("--no-log", is_flag=True, help="write the files only; log nothing to MLflow")
def frontier(limit, delta, replay, out, readme, experiment, no_log):
    """Accuracy against skipped layer compute on the bundled tiny model: every fixed
    configuration and the adaptive policy at several thresholds (table, JSON, plot)."""
    from ..tiny.frontier import floats, run as run_frontier
    result = run_frontier(limit, floats(delta), floats(replay), out, readme)
    if no_log:
        return
    from ..tracking.report import log_report
    metrics = {f"{m}.{name.replace(' ', '_').replace('=', '')}": v for name, r in result["results"].items()
               for m, v in (("accuracy", r.accuracy), ("skipped_fraction", r.skipped_fraction))}
    run_id = log_report("frontier", f"frontier tiny_gsm n={limit}", [out / "frontier.md", out / "frontier.json",
                        out / "frontier.png"], metrics, {"limit": limit, "delta": delta, "replay": replay},
                        experiment)
    click.echo(f"logged to MLflow run {run_id}")
