"""What the commands share: options that parse with the settings' declaration, durations, and
the package's errors turned into one line."""
from __future__ import annotations

from contextlib import contextmanager

import click

from ..errors import AuditFailed, ConfigError, GridFailed, SettingError
from ..settings import SPECS, Spec
from ..study.store import STALE_AFTER_S, format_duration, parse_duration


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


class Duration(click.ParamType):
    """`90s`, `10m`, `2h`, `1d` or seconds, as seconds."""
    name = "duration"

    def convert(self, value, param, ctx):
        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def stale_after_option(dest: str = "stale_after"):
    return click.option("--stale-after", dest, type=Duration(), default=format_duration(STALE_AFTER_S),
                        show_default=True, help="a RUNNING run whose heartbeat (written every 30 s) is older "
                        "than this is dead, its process gone; e.g. 90s, 10m, 2h")


@contextmanager
def one_line():
    """The package's errors as one line, never a traceback: a value no setting takes is a usage
    error (exit 2); any other refusal, or runs that failed, exit 1."""
    try:
        yield
    except SettingError as e:
        raise click.UsageError(str(e)) from None
    except (ConfigError, GridFailed, AuditFailed) as e:
        raise click.ClickException(str(e)) from None
