"""The files that must agree with the settings' declaration (reuse_exp/settings.py), written
from it: MLproject's parameters and command, and the README's settings table. Tests compare
the files with these; `python -m reuse_exp.cli.declared_files mlproject|readme` prints them."""
from __future__ import annotations

import sys

from ..knobs import MLFLOW_PID
from ..settings import SPECS


def mlproject_parameters() -> str:
    """MLproject's `parameters:` block and command, as MLproject holds them."""
    declared = [s for s in SPECS if s.mlproject]
    lines = ["    parameters:"]
    for s in declared:
        default = s.text()
        quoted = f'"{default}"' if s.mlproject_type == "string" else default
        lines.append(f"      {s.name}: {{type: {s.mlproject_type}, default: {quoted}}}")
    args = " ".join(f"{s.option} {{{s.name}}}" for s in declared)
    lines += ["    # Other -P NAME=VALUE reach the command as --NAME VALUE. `exec`: whatever shell MLflow",
              "    # starts (and conda's activation in it), the command is MLflow's own child, pid $PPID.",
              "    command: >-", f"      {MLFLOW_PID.name}=$PPID exec python -m reuse_exp.cli run",
              *_wrap(args, "      ")]
    return "\n".join(lines) + "\n"


def _wrap(text: str, indent: str, width: int = 96) -> list[str]:
    lines, line = [], ""
    for word_pair in _pairs(text.split(" ")):
        if line and len(indent + line + " " + word_pair) > width:
            lines.append(indent + line)
            line = word_pair
        else:
            line = f"{line} {word_pair}".strip()
    return lines + ([indent + line] if line else [])


def _pairs(words: list[str]) -> list[str]:
    return [" ".join(words[i:i + 2]) for i in range(0, len(words), 2)]


def readme_table() -> str:
    """The README's table of settings (between its `settings-table` markers)."""
    rows = ["| setting | type | default | meaning |", "| --- | --- | --- | --- |"]
    for s in SPECS:
        kind = {"str": "string", "optional": "string", "paths": "directories", "choice": "one of",
                "policy": "one of"}.get(s.kind, s.kind)
        allowed = f" ({', '.join(s.choices)})" if s.choices and "`" not in s.help else ""
        rows.append(f"| `{s.name}` | {kind} | `{s.text() or 'none'}` | {s.help}{allowed} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "readme"
    sys.stdout.write(mlproject_parameters() if what == "mlproject" else readme_table())
