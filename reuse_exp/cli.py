"""`reuse-exp`: the tracked run, lm-eval's CLI with the model registered, and the grid's commands.

Bad input ends in one line naming the fix (click's usage errors), never a traceback.
Options also take underscore spellings (`--max_new_tokens`), because `mlflow run` passes
an -P parameter that MLproject does not declare as `--NAME VALUE`.
"""
from __future__ import annotations

import sys

import click

from .reuse import MODES, SCOPES, SUBSETS


class SubsetType(click.ParamType):
    """first, middle, last, or explicit layer indices like 1,2,3."""
    name = "subset"

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)) or value in SUBSETS:
            return value
        try:
            layers = tuple(int(x) for x in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r}: use {', '.join(SUBSETS)} or layer indices like 8,9,10", param, ctx)
        return layers


class LimitType(click.ParamType):
    """none/all, a count of samples, or a fraction in (0, 1)."""
    name = "limit"

    def convert(self, value, param, ctx):
        if value is None or str(value).strip().lower() in ("", "none", "all"):
            return None
        try:
            x = float(value)
        except ValueError:
            self.fail(f"{value!r}: give a number of samples, a fraction below 1, or none", param, ctx)
        if x <= 0:
            self.fail(f"{value!r}: the limit must be positive (or none for the whole task)", param, ctx)
        if x < 1:
            return x
        if x != int(x):
            self.fail(f"{value!r}: a limit of 1 or more must be a whole number of samples", param, ctx)
        return int(x)


def opt(*names, **kw):
    """An option that also answers to its underscore spelling."""
    long = [n for n in names if n.startswith("--") and "-" in n[2:]]
    return click.option(*names, *[n.replace("-", "_").replace("__", "--", 1) for n in long], **kw)


@click.group()
def main():
    """Layer reuse in Fast-dLLM v2, evaluated with lm-eval and tracked with MLflow."""


@main.command()
@opt("--task", default="tiny_gsm", show_default=True, help="lm-eval task (bundled: tiny_gsm, tiny_mc)")
@opt("--model", default="bundled", show_default=True,
     help="checkpoint dir, hub id, `bundled` (the tiny model) or random:<shape> (random weights: dry runs)")
@opt("--k", type=click.IntRange(min=1), default=1, show_default=True, help="recompute every k-th step (1: no reuse)")
@opt("--subset", type=SubsetType(), default="first", show_default=True,
     help="layers to reuse: first, middle, last or indices like 8,9,10")
@opt("--mode", type=click.Choice(MODES), default="output", show_default=True)
@opt("--scope", type=click.Choice(SCOPES), default="block", show_default=True)
@opt("--limit", type=LimitType(), default=None, help="samples per task (default: all)")
@opt("--threshold", type=click.FloatRange(0, 1), default=0.9, show_default=True)
@opt("--block-size", type=click.IntRange(min=1), default=32, show_default=True)
@opt("--small-block-size", type=click.IntRange(min=1), default=8, show_default=True)
@opt("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
     help="cap on each request's max_gen_toks")
@opt("--use-block-cache", type=click.BOOL, default=True, show_default=True)
@opt("--decode-path", type=click.Choice(["auto", "eager", "fast"]), default="auto", show_default=True,
     help="auto: CUDA graphs + compiled layers on a GPU, plain PyTorch on CPU")
@opt("--num-fewshot", type=click.IntRange(min=0), default=0, show_default=True)
@opt("--apply-chat-template", type=click.BOOL, default=True, show_default=True)
@opt("--fewshot-as-multiturn", type=click.BOOL, default=True, show_default=True)
@opt("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@opt("--seed", type=int, default=1234, show_default=True)
@opt("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto", show_default=True,
     help="auto: bfloat16 on a GPU, float32 on CPU")
@opt("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N")
@opt("--revision", default=None, help="hub revision of --model")
@opt("--tokenizer", default=None, help="tokenizer dir (default: the checkpoint's; random:<shape>: the bundled one)")
@opt("--include-path", multiple=True, type=click.Path(exists=True, file_okay=False),
     help="extra lm-eval task directory (repeatable)")
@opt("--experiment", default=None, help="MLflow experiment when not started by `mlflow run`")
@opt("--allow-dirty", type=click.BOOL, is_flag=False, flag_value=True, default=False, show_default=True,
     help="run from a tree with uncommitted changes (tagged dirty, diff logged)")
def run(**kw):
    """Evaluate one configuration and log it to MLflow (the MLproject's entry point)."""
    from . import tracking
    kw["include_path"] = tuple(kw["include_path"])
    if kw["block_size"] % kw["small_block_size"]:
        raise click.UsageError(f"--small-block-size {kw['small_block_size']} must divide "
                               f"--block-size {kw['block_size']}")
    try:
        run_id = tracking.run(tracking.RunSettings(**kw))
    except tracking.RunFailed as e:
        click.echo(f"reuse-exp: {e.line}", err=True)
        sys.exit(e.code)
    click.echo(f"finished: MLflow run {run_id}")


@main.command("lm-eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                           "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def lm_eval_cli(args):
    """lm-eval's own CLI with the `fast_dllm_v2` model registered: reuse-exp lm-eval run --model fast_dllm_v2 ..."""
    from lm_eval.__main__ import cli_evaluate

    from . import harness  # noqa: F401  registers fast_dllm_v2
    args = list(args)
    if args[:1] == ["run"] and "--device" not in args:
        args += ["--device", "auto"]  # lm-eval's default is cuda:0, even without a GPU
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


# The grid's commands (issue 5) live in their own modules: (module, command object) pairs,
# registered when the module is in the tree.
GRID_COMMANDS = (("grid", "grid"), ("compare", "compare_cmd"), ("audit", "audit_cmd"))


def _register_grid_commands() -> None:
    import importlib
    for module, attr in GRID_COMMANDS:
        try:
            mod = importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{module}":  # the module is there but broken: say so
                raise
            continue
        main.add_command(getattr(mod, attr))


_register_grid_commands()

if __name__ == "__main__":
    main()
